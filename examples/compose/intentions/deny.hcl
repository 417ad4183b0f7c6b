# docker compose exec consul consul config write /consul/intentions/deny.hcl
Kind = "service-intentions"
Name = "backend"
Sources = [
  { Name = "frontend", Action = "deny" },
  { Name = "*", Action = "deny" },
]
