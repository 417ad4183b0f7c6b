# ferry — see README.md. Everything here works as root on a fresh Linux
# machine with Go installed; missing system packages are installed first.

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# The release build: static, reproducible paths. Dockerfile and the static
# binary test use the same flags.
LDFLAGS := -s -w -X main.version=$(VERSION)
BENCH   ?= full

UNIT_PKGS = $(shell $(GO) list ./... | grep -v '/test/')

.PHONY: all build test unit e2e vet deps consul k8stools demo bench reliability fuzz fmt clean compose-images compose-up compose-down ktls-test

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ferry ./cmd/ferry

# Installs the packages of every program in test/testbed/programs.txt
# (WITH_BENCH is kept for compatibility: the list includes HAProxy, which
# the e2e bench smoke test runs).
deps:
	@WITH_BENCH=1 test/scripts/deps.sh

# consul builds the test agent (Consul v1.14.11) once; tests reuse it.
consul:
	@$(GO) run ./test/cmd/buildconsul

# k8stools builds kube-apiserver, etcd and cnitool from the nested module
# test/k8stools once (about ten minutes cold on two cores); tests reuse them.
k8stools:
	@$(GO) run ./test/cmd/buildk8s

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

unit:
	$(GO) test -race $(UNIT_PKGS)
	# Allocation tests again without -race, whose sync.Pool drops items.
	$(GO) test -count=1 -run 'Allocs' $(UNIT_PKGS)

e2e: deps consul k8stools
	$(GO) test -count=1 -timeout 40m ./test/...

test: deps vet unit e2e

# The kernel TLS suites (ktls/, and the proxy's two-sidecar data path) inside
# User-Mode Linux, whose kernel has the tls module this machine's kernel
# lacks (e2e runs them too, in test/uml).
ktls-test: deps
	$(GO) test -count=1 -run 'UnderUML' ./test/uml/

demo: deps consul
	$(GO) run ./test/demo

# make bench: the full run (~6 min); make bench BENCH=quick: < 2 min;
# BENCH_FLAGS passes more flags (e.g. -pin, -paths, -scenarios).
bench: deps consul
	$(GO) run ./test/bench $(if $(filter quick,$(BENCH)),-quick) $(BENCH_FLAGS)

# The docker compose example (examples/compose, README "Local mesh with
# docker compose"): ferry's own Docker Engine on /run/ferry-docker.sock, the
# images built from the Dockerfile without pulling (missing base images are
# made locally), then Consul and two meshed apps. The first run takes a few
# minutes (debootstrap, Docker Compose's build); later ones seconds.
compose-images: deps consul
	@$(GO) run ./test/cmd/composeenv images

compose-up: deps consul
	@$(GO) run ./test/cmd/composeenv up

compose-down:
	@$(GO) run ./test/cmd/composeenv down

# make reliability: the full suite (~15 min) writes reliability/results/<date>-full.md
# with its charts; QUICK=1: the CI suite (~4 min, also run by make test through
# test/e2e/reliability_smoke_test.go); SOAK=30m: the churn scenario for 30 min
# with leak tracking. Exits non-zero on a lost or corrupted byte, a silent
# truncation, a leaked fd or a crashed sidecar.
reliability: deps consul
	$(GO) run ./test/reliability $(if $(QUICK),-quick) $(if $(SOAK),-soak $(SOAK)) $(RELIABILITY_FLAGS)

# make fuzz: every fuzz target for FUZZTIME each (default 5s; FUZZTIME=10m
# for a long run). Not part of make test (about a minute and a half in all).
FUZZTIME ?= 5s
fuzz:
	@set -e; for pkg in $$($(GO) list ./... | grep -v '/test/'); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/^func //'); do \
	    echo "== $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin .cache
