// Package compose pins Docker Compose v2 (github.com/docker/compose/v5) as a
// tool for the compose example's e2e test and `make compose-up`: it is built
// from here into .cache/bin/docker-compose (test/dockerenv), like Consul from
// test/tools. Its own module keeps Compose's dependencies out of Consul's.
package compose
