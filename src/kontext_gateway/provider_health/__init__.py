"""Provider health: the circuit breaker per (provider, model) and the latency EWMA per route that the
Router consults to skip failing providers and to order the others.

- `local.ProviderHealth`: in this process only (the default, `provider_health_url` "memory").
- `shared.SharedProviderHealth`: shared by every process on one Redis or PostgreSQL, so that they
  open and close a breaker together; each keeps a local view of the shared state, refreshed at most
  every second, and falls back to its own breakers while the store does not answer.
- `state.HealthStore`: what a shared store does (atomic steps on the store's own clock), with its
  two implementations `redis_store.RedisHealthStore` and `store.provider_health.PostgresHealthStore`.
- `backends.open_provider_health`: the right one for the settings.
"""
