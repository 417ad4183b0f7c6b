# docker compose exec consul consul config write /consul/intentions/allow.hcl
# (the same entry as consul/intentions.hcl writes at start)
Kind = "service-intentions"
Name = "backend"
Sources = [
  { Name = "frontend", Action = "allow" },
  { Name = "*", Action = "deny" },
]
