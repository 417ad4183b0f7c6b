//go:build tools

// Package tools names the main packages this module builds, so that
// `go mod tidy` keeps their requirements.
package tools

import (
	_ "github.com/containernetworking/cni/cnitool"
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
