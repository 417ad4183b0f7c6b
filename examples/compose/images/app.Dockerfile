# The example app (examples/compose/app): its static binary alone on scratch.
# The build context is a directory holding the binary as ./app, built on the
# host (make compose-images does this):
#   CGO_ENABLED=0 go build -trimpath -o CTX/app ./examples/compose/app
#   docker build -f examples/compose/images/app.Dockerfile -t ferry-example/app:dev CTX
FROM scratch
COPY app /app
ENTRYPOINT ["/app"]
