# The example's Consul server: the consul binary on Debian. The build context
# is a directory holding that binary as ./consul (make compose-images uses the
# test agent, Consul v1.14.11, from .cache/bin/consul). Where a registry is
# reachable, hashicorp/consul:1.14 works the same in compose.yaml.
FROM debian:bookworm-slim
COPY consul /bin/consul
RUN mkdir -p /consul/config /consul/data
ENTRYPOINT ["/bin/consul"]
CMD ["agent", "-dev", "-client", "0.0.0.0"]
