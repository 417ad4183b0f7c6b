package inject

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/ferrymesh/ferry/internal/certfile"
	"github.com/hashicorp/go-hclog"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
)

// maxReviewBytes bounds an AdmissionReview body; the API server caps
// objects at a few MiB.
const maxReviewBytes = 8 << 20

// NamespaceLabels returns the labels of a namespace. The webhook needs them
// for the transparent-proxy and consul-dns namespace defaults; an error
// refuses the pod (better than meshing it differently from what the
// namespace asks).
type NamespaceLabels func(ctx context.Context, namespace string) (map[string]string, error)

// Webhook answers AdmissionReview v1 requests for pods with the patch that
// injects them (Pod, as a JSON patch).
type Webhook struct {
	Config     Config
	Namespaces NamespaceLabels
	Log        hclog.Logger
}

func (w *Webhook) logger() hclog.Logger {
	if w.Log == nil {
		return hclog.NewNullLogger()
	}
	return w.Log
}

// Handler serves /mutate, and /healthz for the webhook's own probes.
func (w *Webhook) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/mutate", w.serveMutate)
	mux.HandleFunc("/healthz", func(rw http.ResponseWriter, _ *http.Request) { rw.WriteHeader(http.StatusOK) })
	return mux
}

func (w *Webhook) serveMutate(rw http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(rw, "POST an AdmissionReview", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxReviewBytes+1))
	if err != nil {
		http.Error(rw, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(body) > maxReviewBytes {
		http.Error(rw, "AdmissionReview too large", http.StatusRequestEntityTooLarge)
		return
	}
	var review admissionv1.AdmissionReview
	if err := kjson.UnmarshalCaseSensitivePreserveInts(body, &review); err != nil || review.Request == nil {
		http.Error(rw, fmt.Sprintf("not an AdmissionReview v1 request: %v", err), http.StatusBadRequest)
		return
	}
	resp := w.Review(r.Context(), review.Request)
	resp.UID = review.Request.UID
	out, err := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Response: resp,
	})
	if err != nil {
		http.Error(rw, err.Error(), http.StatusInternalServerError)
		return
	}
	rw.Header().Set("Content-Type", "application/json")
	rw.Write(out)
}

func deny(code int32, format string, args ...any) *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{Allowed: false,
		Result: &metav1.Status{Status: metav1.StatusFailure, Code: code, Message: fmt.Sprintf(format, args...)}}
}

// Review decides one admission request: pods being created are injected;
// anything else is allowed unchanged.
func (w *Webhook) Review(ctx context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	log := w.logger().With("namespace", req.Namespace, "name", req.Name, "uid", string(req.UID))
	if req.Kind.Kind != "Pod" || req.Kind.Group != "" || req.SubResource != "" || req.Operation != admissionv1.Create {
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	var pod corev1.Pod
	if err := kjson.UnmarshalCaseSensitivePreserveInts(req.Object.Raw, &pod); err != nil {
		log.Warn("undecodable pod", "error", err)
		return deny(http.StatusBadRequest, "ferry inject: could not decode the pod: %v", err)
	}
	nsName := req.Namespace
	if nsName == "" {
		nsName = pod.Namespace
	}
	ns := Namespace{Name: nsName}
	if nsName != "kube-system" && nsName != "kube-public" && pod.Annotations[KeyInjectStatus] == "" && w.Namespaces != nil {
		labels, err := w.Namespaces(ctx, nsName)
		if err != nil {
			log.Error("namespace labels", "error", err)
			return deny(http.StatusInternalServerError, "ferry inject: reading namespace %s: %v", nsName, err)
		}
		ns.Labels = labels
	}
	out, skip, err := Pod(w.Config, ns, &pod)
	var refused *RefusedError
	switch {
	case errors.As(err, &refused):
		log.Info("pod refused", "reason", refused.Reason)
		return deny(http.StatusBadRequest, "ferry inject: %v", err)
	case err != nil:
		log.Error("injection failed", "error", err)
		return deny(http.StatusInternalServerError, "ferry inject: %v", err)
	case skip != "":
		log.Debug("pod not injected", "reason", skip)
		return &admissionv1.AdmissionResponse{Allowed: true, Result: &metav1.Status{Message: skip}}
	}
	ops, err := PodPatch(&pod, out)
	if err == nil {
		var patch []byte
		if patch, err = json.Marshal(ops); err == nil {
			pt := admissionv1.PatchTypeJSONPatch
			log.Info("pod injected", "operations", len(ops))
			return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: &pt}
		}
	}
	log.Error("patch", "error", err)
	return deny(http.StatusInternalServerError, "ferry inject: patch: %v", err)
}

// Serve runs the webhook over TLS on ln until ctx is done, then shuts down
// with a deadline for requests in flight.
func (w *Webhook) Serve(ctx context.Context, ln net.Listener, certs *certfile.Reloader) error {
	if err := certs.Load(); err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           w.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		TLSConfig:         certfile.ServerConfig(certs, nil),
		ErrorLog:          w.logger().StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug}),
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-done:
		return fmt.Errorf("inject: webhook server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-done
	return err
}
