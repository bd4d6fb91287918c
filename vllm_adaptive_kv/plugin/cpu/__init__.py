"""CPU-only vLLM glue: the CPU worker and runner, and the call into vLLM's CPU
attention kernel."""
