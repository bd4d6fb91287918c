"""Command-line apps that drive the core or vLLM: demo, batch demo, eval, bench,
overhead, and the prompt generators they share."""
