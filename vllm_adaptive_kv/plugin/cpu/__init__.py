"""CPU-only vLLM glue: the CPU worker and runner (and the attention-path choice), the
CPU backend class, and the native attention path over vLLM's CPU kernel."""
