"""`qexport generate ARTIFACT --prompt-ids 1,2,3 -n 32`: greedy generation through a language model's
artifact (.pt2, AOTI package, .pte, .onnx from `qexport.export_lm`), with prefill time and decode tokens/s."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ._common import PIN_HELP, fmt_seconds, parse_pins


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy token generation through a language model's artifact",
        description="Run greedy generation through ARTIFACT (a .pt2, AOTI package, .pte or .onnx made from "
        "qexport.export_lm): the prompt in one call, then one call per new token. Prints the new tokens, "
        "then the prefill time and decode tokens/s. The request is checked against the artifact's vocabulary "
        "and KV-cache length before anything runs.",
        epilog="example: qexport generate lm_aoti.pt2 --prompt-ids 1,2,3 -n 32",
    )
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--prompt-ids", required=True, metavar="IDS", help="the prompt's token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's end-of-sequence token")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--expected-sha256", action="append", default=None, metavar="FILE=SHA256", help=PIN_HELP)
    p.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    parts = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    if not parts:
        raise UsageError("--prompt-ids is empty; give token ids joined by commas, e.g. --prompt-ids 1,2,3")
    try:
        ids = [int(t) for t in parts]
    except ValueError:
        raise UsageError(f"--prompt-ids {text!r}: not integers joined by commas, e.g. --prompt-ids 1,2,3") from None
    return ids


def run(args: argparse.Namespace) -> int:
    prompt = parse_ids(args.prompt_ids)
    if args.max_new_tokens < 1:
        raise UsageError("-n/--max-new-tokens must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    pins = parse_pins(args.expected_sha256, [args.artifact])
    import torch

    from ..generation import generate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pin = next(iter(pins.values()), None) if pins else None
    result = generate(args.artifact, prompt, args.max_new_tokens, stop_at_eos=not args.no_eos, expected_sha256=pin)
    print(",".join(map(str, result.tokens)))
    rate = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else "-"
    stop = " (stopped at end-of-sequence)" if result.stopped_at_eos else ""
    print(f"prompt {result.prompt_len} tokens: prefill {fmt_seconds(result.prefill_s)}; "
          f"{len(result.tokens)} new tokens{stop}; decode {rate}")
    return 0
