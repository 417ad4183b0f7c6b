// Package inject turns a Kubernetes pod (or a workload's pod template) into
// a ferry-meshed one, the way consul-k8s's mutating webhook injects a
// transparent-proxy pod, with ferry in place of consul-dataplane:
//
//   - an init container running `ferry redirect`, fed the same
//     CONSUL_REDIRECT_TRAFFIC_CONFIG JSON consul-k8s computes (proxy UID 5995,
//     inbound 20000, outbound 15001, probe ports 20300+i/20400+i/20500+i, the
//     metrics port, the pod's exclusion annotations, Consul DNS);
//   - the ferry sidecar with consul-dataplane's argument list, UID 5995, a
//     read-only root and no capabilities; as a native sidecar (an init
//     container with restartPolicy Always) when asked;
//   - HTTP probes moved to the expose ports, the original pod kept in the
//     consul.hashicorp.com/original-pod annotation, DNS config when Consul
//     DNS is on, and the upstream environment variables.
//
// Pod is a pure function of a Config, a pod and its namespace's labels.
// Diff and ApplyPatch turn two JSON documents into an RFC 6902 patch and
// back, so that the webhook answers with a patch and `ferry inject` edits a
// manifest without dropping the fields the API types do not know. Manifest
// reads and writes multi-document YAML; Webhook serves AdmissionReview v1.
//
// The package imports redirect only to validate the redirect JSON before a
// pod is admitted: a bad exclusion annotation is refused at admission, not
// discovered by a crash-looping init container.
package inject
