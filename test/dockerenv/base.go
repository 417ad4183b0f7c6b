package dockerenv

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/test/testbed"
)

// fromRe matches a Dockerfile FROM line: image and optional stage name.
var fromRe = regexp.MustCompile(`(?i)^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$`)

// BaseImages returns the images a Dockerfile builds FROM, in order, leaving
// out scratch and its own earlier stages.
func BaseImages(dockerfile string) ([]string, error) {
	f, err := os.Open(dockerfile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	stages := map[string]bool{}
	var images []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := fromRe.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		img := m[1]
		if !strings.EqualFold(img, "scratch") && !stages[strings.ToLower(img)] {
			images = append(images, img)
		}
		if m[2] != "" {
			stages[strings.ToLower(m[2])] = true
		}
	}
	return images, sc.Err()
}

// EnsureBaseImages makes sure each image the Dockerfiles build FROM exists in
// the engine. One that is missing is never pulled: it is made locally, with
// the exact name the Dockerfile uses, so `docker build` finds it —
//
//   - debian:<suite>-slim and debian:<suite>: a debootstrap (minbase) root of
//     that suite from the mirror apt uses, imported with `docker import`;
//   - golang:<version>-<suite>: that root plus the local Go toolchain in
//     /usr/local/go, with the official image's environment (GOPATH=/go,
//     PATH, GOTOOLCHAIN=local); the local toolchain must be that version.
//
// Both leave out what Debian's slim images leave out (docs, manuals,
// translations) and carry the host's CA bundle (see hostCABundle).
//
// Where a registry is reachable, `docker pull` of the real images before
// building gives the Dockerfile's usual meaning; this only fills in what is
// missing. Root filesystems are cached under .cache/docker-base by their
// inputs (suite, mirror, packages).
func (d *Docker) EnsureBaseImages(ctx context.Context, logf func(string, ...any), dockerfiles ...string) error {
	seen := map[string]bool{}
	for _, df := range dockerfiles {
		imgs, err := BaseImages(df)
		if err != nil {
			return err
		}
		for _, img := range imgs {
			if seen[img] {
				continue
			}
			seen[img] = true
			if _, err := d.Output(ctx, "image", "inspect", "--format", "{{.Id}}", img); err == nil {
				continue
			}
			begin := time.Now()
			if err := d.makeBase(ctx, img, logf); err != nil {
				return err
			}
			logf("dockerenv: made %s locally in %v", img, time.Since(begin).Round(time.Second))
		}
	}
	return nil
}

var (
	debianRe = regexp.MustCompile(`^(?:docker\.io/)?(?:library/)?debian:([a-z]+)(?:-slim)?$`)
	golangRe = regexp.MustCompile(`^(?:docker\.io/)?(?:library/)?golang:(\d+\.\d+(?:\.\d+)?)-([a-z]+)$`)
)

func (d *Docker) makeBase(ctx context.Context, img string, logf func(string, ...any)) error {
	if m := debianRe.FindStringSubmatch(img); m != nil {
		rootfs, err := d.debianRootfs(ctx, m[1], logf)
		if err != nil {
			return err
		}
		return d.importTar(ctx, img, func(w io.Writer) error {
			tw := tar.NewWriter(w)
			if err := copyEntries(tw, rootfs); err != nil {
				return err
			}
			if err := writeSlimConfig(tw); err != nil {
				return err
			}
			return tw.Close()
		}, `CMD ["bash"]`)
	}
	if m := golangRe.FindStringSubmatch(img); m != nil {
		goroot, goVersion, err := localGo(ctx)
		if err != nil {
			return err
		}
		if goVersion != m[1] && !strings.HasPrefix(goVersion, m[1]+".") {
			return fmt.Errorf("dockerenv: %s is not in the engine and the local Go is %s, not %s: pull the image or install that Go", img, goVersion, m[1])
		}
		rootfs, err := d.debianRootfs(ctx, m[2], logf)
		if err != nil {
			return err
		}
		return d.importTar(ctx, img, func(w io.Writer) error {
			tw := tar.NewWriter(w)
			if err := copyEntries(tw, rootfs); err != nil {
				return err
			}
			if err := writeSlimConfig(tw); err != nil {
				return err
			}
			if err := addTree(tw, goroot, "usr/local/go"); err != nil {
				return err
			}
			for _, dir := range []string{"go", "go/bin", "go/src"} {
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o777, ModTime: time.Unix(0, 0)}); err != nil {
					return err
				}
			}
			return tw.Close()
		},
			"ENV GOLANG_VERSION="+goVersion,
			"ENV GOTOOLCHAIN=local",
			"ENV GOPATH=/go",
			"ENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"WORKDIR /go",
			`CMD ["bash"]`)
	}
	return fmt.Errorf("dockerenv: image %s is not in the engine and cannot be made locally (only debian:<suite>[-slim] and golang:<version>-<suite> can); pull or load it", img)
}

func localGo(ctx context.Context) (goroot, version string, err error) {
	out, err := command(ctx, "go", "env", "GOROOT", "GOVERSION").Output()
	if err != nil {
		return "", "", fmt.Errorf("dockerenv: go env: %w", err)
	}
	f := strings.Fields(string(out))
	if len(f) != 2 {
		return "", "", fmt.Errorf("dockerenv: go env: unexpected output %q", out)
	}
	return f[0], strings.TrimPrefix(f[1], "go"), nil
}

// importTar streams a root filesystem into `docker import` as image name.
func (d *Docker) importTar(ctx context.Context, name string, write func(io.Writer) error, changes ...string) error {
	args := []string{"import"}
	for _, c := range changes {
		args = append(args, "--change", c)
	}
	args = append(args, "-", name)
	cmd := command(ctx, d.CLI, args...)
	cmd.Env = d.Env()
	pr, pw := io.Pipe()
	cmd.Stdin = pr
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return err
	}
	werr := write(pw)
	pw.CloseWithError(werr)
	err := cmd.Wait()
	pr.Close()
	if werr != nil {
		return fmt.Errorf("dockerenv: import %s: %w", name, werr)
	}
	if err != nil {
		return fmt.Errorf("dockerenv: docker import %s: %w\n%s", name, err, out.String())
	}
	return nil
}

// debianRootfs returns a tarball of a minbase debootstrap of suite (with
// ca-certificates, which the Go build stage needs for its module proxy),
// made once per suite, mirror and package list.
func (d *Docker) debianRootfs(ctx context.Context, suite string, logf func(string, ...any)) (string, error) {
	mirror := AptMirror()
	const include = "ca-certificates"
	h := sha256.Sum256([]byte(strings.Join([]string{suite, "minbase", mirror, include}, "\n")))
	dir := filepath.Join(MachineCache(), "docker-base")
	out := filepath.Join(dir, fmt.Sprintf("debian-%s-minbase-%s.tar", suite, hex.EncodeToString(h[:6])))
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if _, err := testbed.LookPath("debootstrap"); err != nil {
		return "", fmt.Errorf("dockerenv: debootstrap not found (test/scripts/deps.sh installs it)")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	work, err := os.MkdirTemp(dir, "rootfs-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	logf("dockerenv: debootstrap %s from %s (once; a minute or two)", suite, mirror)
	cmd := command(ctx, "debootstrap", "--variant=minbase", "--include="+include, suite, work, mirror)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("dockerenv: debootstrap: %w\n%s", err, tailLines(string(b), 20))
	}
	// What the slim images leave out too: downloaded packages and lists.
	for _, g := range []string{"var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "var/log/*.log"} {
		m, _ := filepath.Glob(filepath.Join(work, g))
		for _, p := range m {
			os.RemoveAll(p)
		}
	}
	tmp := out + ".tmp"
	tarCmd := command(ctx, "tar", "--numeric-owner", "-C", work, "-cf", tmp, ".")
	if b, err := tarCmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("dockerenv: tar rootfs: %w\n%s", err, b)
	}
	return out, os.Rename(tmp, out)
}

// AptMirror is the Debian mirror this machine's apt uses (deb822 URIs: or a
// one-line deb entry), so debootstrap reaches what apt-get reaches.
func AptMirror() string {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	files = append(files, "/etc/apt/sources.list")
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(files, more...)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			var uri string
			switch {
			case len(fields) >= 2 && fields[0] == "URIs:":
				uri = fields[1]
			case len(fields) >= 3 && fields[0] == "deb":
				uri = fields[1]
				if strings.HasPrefix(uri, "[") { // deb [options] uri
					for i, f := range fields {
						if strings.HasSuffix(f, "]") && i+1 < len(fields) {
							uri = fields[i+1]
							break
						}
					}
				}
			}
			if strings.HasSuffix(strings.TrimRight(uri, "/"), "/debian") {
				return uri
			}
		}
	}
	return "http://deb.debian.org/debian"
}

// hostCABundle is the host's trust store. A base image made here trusts what
// the host trusts: behind a TLS-inspecting proxy (as on many corporate build
// machines, and this project's) the build stage's module downloads would fail
// with the bundle debootstrap installed.
const hostCABundle = "/etc/ssl/certs/ca-certificates.crt"

// copyEntries copies every entry of the tarball at path into tw, with the
// host's CA bundle in place of the root's.
func copyEntries(tw *tar.Writer, path string) error {
	bundle, err := os.ReadFile(hostCABundle)
	if err != nil {
		bundle = nil // no bundle on the host: keep the root's
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := strings.TrimPrefix(h.Name, "./")
		if slimDrop(name, h) {
			continue
		}
		if bundle != nil && name == strings.TrimPrefix(hostCABundle, "/") && h.Typeflag == tar.TypeReg {
			h.Size = int64(len(bundle))
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			if _, err := tw.Write(bundle); err != nil {
				return err
			}
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return err
		}
	}
}

// slimExclude is what Debian's -slim images leave out, as dpkg config so
// that packages installed later (the init stage's iptables) leave it out too.
const slimExclude = `path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
`

// slimDrop says whether a root filesystem entry is one the slim images drop:
// documentation, manuals and translations (directories stay).
func slimDrop(name string, h *tar.Header) bool {
	if h.Typeflag == tar.TypeDir {
		return false
	}
	for _, dir := range []string{"usr/share/groff/", "usr/share/info/", "usr/share/locale/", "usr/share/man/"} {
		if strings.HasPrefix(name, dir) {
			return true
		}
	}
	return strings.HasPrefix(name, "usr/share/doc/") && !strings.HasSuffix(name, "/copyright")
}

// writeSlimConfig adds the dpkg exclusions to a root filesystem.
func writeSlimConfig(tw *tar.Writer) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/dpkg/dpkg.cfg.d/docker-slim", Mode: 0o644, Size: int64(len(slimExclude)), ModTime: time.Unix(0, 0)}); err != nil {
		return err
	}
	_, err := tw.Write([]byte(slimExclude))
	return err
}

// addTree adds the tree at src to tw under prefix, owned by root.
func addTree(tw *tar.Writer, src, prefix string) error {
	return filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(filepath.Join(prefix, rel))
		if info.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
}
