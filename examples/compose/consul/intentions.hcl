# The backend accepts the frontend and nobody else. Written once when the
# server elects itself leader; change it later with `consul intention` or
# `consul config write` (see the README).
config_entries {
  bootstrap = [
    {
      kind = "service-intentions"
      name = "backend"
      sources = [
        { name = "frontend", action = "allow" },
        { name = "*", action = "deny" },
      ]
    },
  ]
}
