// Package cni is ferry-cni: a chained CNI plugin that installs a pod's
// traffic redirection rules from the host, with the privileges the kubelet
// (or Nomad) already has, so the pod needs no NET_ADMIN init container.
//
// It replaces consul-cni in place: the same plugin config fields, the same
// inputs (CONSUL_IPTABLES_CONFIG in CNI_ARGS for Nomad, the pod's
// consul.hashicorp.com/redirect-traffic-config annotation for consul-k8s),
// and the same rules, because the rules come from package redirect exactly
// as `ferry redirect` builds and applies them: validated first, one
// iptables-restore transaction per address family, idempotent.
//
// The CNI protocol itself (environment, version negotiation, results and
// errors) is the CNI project's own library (pkg/skel, pkg/types,
// pkg/version); this package only supplies ADD, CHECK and DEL.
//
// Install (install.go) is the node side: it copies the binary into the CNI
// bin dir, appends the plugin to the first network config and writes the
// kubeconfig the plugin reads the pod through; Uninstall undoes it.
package cni
