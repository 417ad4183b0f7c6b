package inject

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/certfile"
	"github.com/hashicorp/go-hclog"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func review(t *testing.T, w *Webhook, kind string, op admissionv1.Operation, obj any) (*admissionv1.AdmissionResponse, int) {
	t.Helper()
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	in := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{UID: types.UID("req-1"), Kind: metav1.GroupVersionKind{Version: "v1", Kind: kind},
			Namespace: "shop", Operation: op, Object: runtime.RawExtension{Raw: raw}},
	}
	body, _ := json.Marshal(in)
	rec := httptest.NewRecorder()
	w.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/mutate", bytes.NewReader(body)))
	if rec.Code != http.StatusOK {
		return nil, rec.Code
	}
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	if out.APIVersion != "admission.k8s.io/v1" || out.Kind != "AdmissionReview" || out.Response == nil || out.Response.UID != "req-1" {
		t.Fatalf("bad review envelope: %s", rec.Body.Bytes())
	}
	return out.Response, rec.Code
}

func testWebhook(labels map[string]string, err error) *Webhook {
	return &Webhook{Config: testConfig(), Log: hclog.NewNullLogger(),
		Namespaces: func(context.Context, string) (map[string]string, error) { return labels, err }}
}

// TestWebhookPatchIsTheInjection: the patch, applied to the pod the API
// server sent, gives exactly the pod Pod computes.
func TestWebhookPatchIsTheInjection(t *testing.T) {
	pod := testPod(map[string]string{AnnotationUpstreams: "db:5432"})
	pod.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/h", Port: intstr.FromString("http")}}}
	for _, labels := range []map[string]string{nil, {KeyConsulDNS: "false"}} {
		resp, _ := review(t, testWebhook(labels, nil), "Pod", admissionv1.Create, pod)
		if !resp.Allowed || resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
			t.Fatalf("response %+v", resp)
		}
		var ops []Op
		if err := json.Unmarshal(resp.Patch, &ops); err != nil {
			t.Fatal(err)
		}
		raw, _ := json.Marshal(pod)
		patched, err := ApplyJSON(raw, ops)
		if err != nil {
			t.Fatal(err)
		}
		var got corev1.Pod
		if err := json.Unmarshal(patched, &got); err != nil {
			t.Fatal(err)
		}
		want, _, err := Pod(testConfig(), Namespace{Name: "shop", Labels: labels}, pod)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(&got, want) {
			t.Errorf("labels %v: patched pod differs from Pod's:\n%s", labels, patched)
		}
		if (got.Spec.DNSPolicy == corev1.DNSNone) != (labels == nil) {
			t.Errorf("labels %v: namespace label not honoured: dnsPolicy %q", labels, got.Spec.DNSPolicy)
		}
	}
}

func TestWebhookDecisions(t *testing.T) {
	bad := testPod(nil)
	bad.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsUser: ptr(sidecarUID)}
	cases := []struct {
		name    string
		w       *Webhook
		kind    string
		op      admissionv1.Operation
		obj     any
		allowed bool
		patch   bool
		code    int32
		msg     string
	}{
		{"inject", testWebhook(nil, nil), "Pod", admissionv1.Create, testPod(nil), true, true, 0, ""},
		{"already injected", testWebhook(nil, nil), "Pod", admissionv1.Create, testPod(map[string]string{KeyInjectStatus: "injected"}), true, false, 0, "already injected"},
		{"update", testWebhook(nil, nil), "Pod", admissionv1.Update, testPod(nil), true, false, 0, ""},
		{"not a pod", testWebhook(nil, nil), "ConfigMap", admissionv1.Create, map[string]any{"data": map[string]string{}}, true, false, 0, ""},
		{"refused", testWebhook(nil, nil), "Pod", admissionv1.Create, bad, false, false, 400, "runAsUser 5995"},
		{"namespace unreadable", testWebhook(nil, errors.New("forbidden")), "Pod", admissionv1.Create, testPod(nil), false, false, 500, "forbidden"},
		{"garbage object", testWebhook(nil, nil), "Pod", admissionv1.Create, []int{1}, false, false, 400, "decode"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, code := review(t, c.w, c.kind, c.op, c.obj)
			if resp == nil {
				t.Fatalf("HTTP %d", code)
			}
			if resp.Allowed != c.allowed || (resp.Patch != nil) != c.patch {
				t.Errorf("allowed %v patch %v, want %v %v", resp.Allowed, resp.Patch != nil, c.allowed, c.patch)
			}
			if c.code != 0 && (resp.Result == nil || resp.Result.Code != c.code) {
				t.Errorf("result %+v, want code %d", resp.Result, c.code)
			}
			if c.msg != "" && (resp.Result == nil || !strings.Contains(resp.Result.Message, c.msg)) {
				t.Errorf("result %+v, want %q", resp.Result, c.msg)
			}
		})
	}
}

func TestWebhookBadRequests(t *testing.T) {
	h := testWebhook(nil, nil).Handler()
	for _, c := range []struct {
		method, body string
		want         int
	}{
		{http.MethodGet, "", http.StatusMethodNotAllowed},
		{http.MethodPost, "{", http.StatusBadRequest},
		{http.MethodPost, `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`, http.StatusBadRequest},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(c.method, "/mutate", strings.NewReader(c.body)))
		if rec.Code != c.want {
			t.Errorf("%s %q: %d, want %d", c.method, c.body, rec.Code, c.want)
		}
	}
}

// writeCert writes a fresh self-signed serving certificate for 127.0.0.1
// with the given serial and returns it.
func writeCert(t *testing.T, certFile, keyFile string, serial int64, mod time.Time) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkixName("ferry-inject"),
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{certFile, keyFile} {
		if err := os.Chtimes(f, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
}

// TestWebhookServeReloadsCertificate: a rotated certificate is served on
// the next handshake, without a restart; a broken pair keeps the old one.
func TestWebhookServeReloadsCertificate(t *testing.T) {
	dir := t.TempDir()
	cf, kf := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	t0 := time.Now().Add(-time.Minute)
	writeCert(t, cf, kf, 1, t0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	w := testWebhook(nil, nil)
	go func() {
		done <- w.Serve(ctx, ln, &certfile.Reloader{CertFile: cf, KeyFile: kf, Log: hclog.NewNullLogger(), What: "webhook certificate"})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	serial := func() int64 {
		t.Helper()
		conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serial(); s != 1 {
		t.Fatalf("serial %d, want 1", s)
	}
	writeCert(t, cf, kf, 2, t0.Add(10*time.Second))
	if s := serial(); s != 2 {
		t.Fatalf("after rotation serial %d, want 2", s)
	}
	if err := os.WriteFile(kf, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if s := serial(); s != 2 {
		t.Fatalf("after a broken key serial %d, want the previous 2", s)
	}
}

func pkixName(cn string) pkix.Name { return pkix.Name{CommonName: cn} }
