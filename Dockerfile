# syntax=docker/dockerfile:1
# ferry images. Two final stages:
#   sidecar (default): the static binary alone, running as UID 5995 — the UID
#                      that the redirect rules exempt, so it never loops.
#   init:              ferry plus iptables, run as root with NET_ADMIN once
#                      per pod to install the rules (`ferry redirect`).
# The build flags are the Makefile's release flags; test/e2e/static_test.go
# builds with the same flags and runs the binary in an empty chroot.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/ferry ./cmd/ferry
# The sidecar image's second name for the binary, as a symlink (scratch has
# no shell to make one, and a copy would double the image).
RUN mkdir -p /out/alias/usr/local/bin && ln -s /ferry /out/alias/usr/local/bin/consul-dataplane

FROM debian:bookworm-slim AS init
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ferry /usr/local/bin/ferry
ENTRYPOINT ["/usr/local/bin/ferry", "redirect"]

FROM scratch AS sidecar
COPY --from=build /out/ferry /ferry
# consul-k8s runs its sidecar image with consul-dataplane's arguments (which
# /ferry takes too: a first argument that is a flag selects that command
# line) and probes native sidecars with /usr/local/bin/consul-dataplane, so
# the binary answers to that name as well (Helm global.imageConsulDataplane).
# No shell in this image: -addresses exec=... needs an image that has one.
COPY --from=build /out/alias/ /
USER 5995:5995
ENTRYPOINT ["/ferry"]
CMD ["run"]
