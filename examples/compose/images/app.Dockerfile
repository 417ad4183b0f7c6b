# The example app (examples/compose/app): a static binary on scratch.
# Build from the repository root:
#   docker build -f examples/compose/images/app.Dockerfile -t ferry-example/app:dev .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
COPY examples/compose/app ./examples/compose/app
# Standard library only: nothing to download.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/app ./examples/compose/app

FROM scratch
COPY --from=build /out/app /app
ENTRYPOINT ["/app"]
