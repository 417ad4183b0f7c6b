package dockerenv

import (
	"archive/tar"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestBaseImages(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	got, err := BaseImages(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	// The project's Dockerfile: both must be images makeBase can make.
	for _, img := range got {
		if !debianRe.MatchString(img) && !golangRe.MatchString(img) {
			t.Errorf("Dockerfile base %q cannot be made locally", img)
		}
	}
	if len(got) != 2 {
		t.Errorf("Dockerfile bases = %v, want a golang and a debian image", got)
	}

	df := filepath.Join(t.TempDir(), "Dockerfile")
	os.WriteFile(df, []byte(`# syntax=docker/dockerfile:1
FROM golang:1.26-bookworm AS build
from --platform=linux/amd64 debian:bookworm-slim as init
FROM build AS again
FROM scratch
FROM init
FROM golang:1.26-bookworm
`), 0o644)
	got, err = BaseImages(df)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"golang:1.26-bookworm", "debian:bookworm-slim", "golang:1.26-bookworm"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("BaseImages = %v, want %v", got, want)
	}
}

func TestBaseNames(t *testing.T) {
	for _, tc := range []struct {
		img            string
		debian, golang string // suite, version
	}{
		{img: "debian:bookworm-slim", debian: "bookworm"},
		{img: "docker.io/library/debian:trixie", debian: "trixie"},
		{img: "golang:1.26-bookworm", golang: "1.26"},
		{img: "golang:1.26.8-bookworm", golang: "1.26.8"},
		{img: "golang:1.26"},
		{img: "alpine:3"},
		{img: "debian:bookworm-20250520"},
	} {
		var d, g string
		if m := debianRe.FindStringSubmatch(tc.img); m != nil {
			d = m[1]
		}
		if m := golangRe.FindStringSubmatch(tc.img); m != nil {
			g = m[1]
		}
		if d != tc.debian || g != tc.golang {
			t.Errorf("%s: debian %q golang %q, want %q %q", tc.img, d, g, tc.debian, tc.golang)
		}
	}
}

func TestSlimDrop(t *testing.T) {
	reg := &tar.Header{Typeflag: tar.TypeReg}
	dir := &tar.Header{Typeflag: tar.TypeDir}
	for _, tc := range []struct {
		name string
		h    *tar.Header
		drop bool
	}{
		{"usr/share/doc/bash/README", reg, true},
		{"usr/share/doc/bash/copyright", reg, false},
		{"usr/share/man/man1/ls.1.gz", reg, true},
		{"usr/share/man/", dir, false},
		{"usr/share/locale/de/LC_MESSAGES/apt.mo", reg, true},
		{"usr/bin/apt", reg, false},
		{"usr/share/zoneinfo/UTC", reg, false},
	} {
		if got := slimDrop(tc.name, tc.h); got != tc.drop {
			t.Errorf("slimDrop(%s) = %v, want %v", tc.name, got, tc.drop)
		}
	}
}
