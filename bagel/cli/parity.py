"""bagel-parity FIXTURE_DIR: compare this implementation with official-code reference outputs.

A fixture directory holds a tiny model in the released layout (llm_config.json,
vit_config.json, ema.safetensors, ae.safetensors, plus ae_config.json / bagel_config.json for
the settings the official code hard-codes) and reference.safetensors + reference.json with the
inputs and outputs of the official code (see tests/assets/README.md). Every case found is run
(bagel/cli/parity_cases.py); one line is printed per compared tensor with its max |difference|
and tolerance.

    bagel-parity tests/assets/bagel_official_tiny [--threads 1]

Exit status: 0 all comparisons within tolerance, 1 some failed, 2 bad arguments or fixture.
"""

from __future__ import annotations

import sys

from bagel.cli.common import Parser, USER_ERRORS, check_device


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="bagel-parity", description=__doc__)
    parser.add_argument("fixture_dir", help="directory in the bagel_official_tiny fixture format")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    import torch

    from bagel.cli.parity_cases import run_all

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_device(args.device)
        results = run_all(args.fixture_dir, args.device)
    except USER_ERRORS as e:
        print(f"bagel-parity: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line())
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
