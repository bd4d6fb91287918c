"""vLLM glue: a thin layer over the pure core, loaded as a vLLM general plugin.

``register`` runs once per process (frontend, engine core, every worker). First it
checks the installed vLLM against ``version.SUPPORTED_VLLM``: outside that range it
installs nothing (one warning; a command line asking for a kv policy exits with one
line naming both versions). Inside it, it only installs the ``--kv-policy`` CLI flags
and engine-argument checks, which pass everything through unchanged when no kv
policy is asked for; the worker, connector and attention backend are switched on by
``engine_args`` only when a kv policy is configured, so vanilla vLLM runs are
untouched.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from .version import check_vllm_version

    if not check_vllm_version():
        return
    from .engine_args import install_engine_arg_hooks

    # The spec type registers itself when vllm_adaptive_kv.plugin.spec is imported
    # (by the attention backend in workers, by unpickling in the engine core), so
    # processes that never use a kv policy import nothing more than this.
    install_engine_arg_hooks()
