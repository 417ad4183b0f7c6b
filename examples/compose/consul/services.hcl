# Agent-mode registration, as HashiCorp's compose examples do it: the Consul
# server agent is also the agent of both apps, so each ferry sidecar runs
# `ferry run -proxy-id <app>-sidecar-proxy` against it (CONSUL_HTTP_ADDR).
# Addresses are the pods' fixed addresses on the example's network.

services {
  id      = "frontend"
  name    = "frontend"
  address = "198.19.42.10"
  port    = 8080
  connect {
    sidecar_service {
      port = 20000
      proxy {
        mode                  = "transparent"
        local_service_address = "127.0.0.1"
        local_service_port    = 8080
      }
      # ferry's /ready (admin on 0.0.0.0:19000, excluded from the redirect):
      # the instance is healthy once its sidecar has identity, intentions
      # and catalog loaded.
      check {
        name     = "ferry ready"
        http     = "http://198.19.42.10:19000/ready"
        interval = "2s"
        timeout  = "1s"
      }
    }
  }
}

services {
  id      = "backend"
  name    = "backend"
  address = "198.19.42.20"
  port    = 8080
  connect {
    sidecar_service {
      port = 20000
      proxy {
        mode                  = "transparent"
        local_service_address = "127.0.0.1"
        local_service_port    = 8080
      }
      check {
        name     = "ferry ready"
        http     = "http://198.19.42.20:19000/ready"
        interval = "2s"
        timeout  = "1s"
      }
    }
  }
}
