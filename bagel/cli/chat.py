"""bagel-chat: ask questions about images, one-shot or interactively.

    bagel-chat --model DIR --image cat.png --question "What is in the picture?"
    bagel-chat --model DIR --image a.png --image b.png --question "What changed?"
    bagel-chat --model DIR [--image cat.png]     # interactive (a terminal): /image PATH, /reset, /quit

In interactive mode the conversation is kept: each answer stays in the context for the next turn.
Without --question, stdin must be a terminal; in a script, pass --question.
Exit status: 0 answered, 1 the model gave an empty answer, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys

from bagel.cli.common import Parser, USER_ERRORS, add_model_args, load_engine, run, warn


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-chat", description=__doc__)
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image, shown before the question (repeatable)")
    p.add_argument("--question", help="ask once, print the answer and exit; without it, start an interactive chat")
    p.add_argument("--think", action="store_true", help="reason in <think> tags before answering")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass; 1 = off")
    p.add_argument("--speculative", choices=["medusa", "mtp", "eagle"], default=None,
                   help="decode with draft heads (same greedy output, same sampling distribution, fewer forwards)")
    p.add_argument("--heads", default=None, help="draft heads directory (default: the model's own heads)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="eagle: draft a dynamic tree of this many nodes per step (default: a chain)")
    p.add_argument("--draft-depth", type=int, default=None,
                   help="eagle: draft steps per verification (default: as deep as it was trained; its one block "
                        "serves any depth, and deeper pays where its drafts keep being accepted)")
    return p


def enable_speculative(engine, kind: str, heads_dir: str | None, spec=None) -> None:
    """`spec`: a bagel.inference.speculative.SpecConfig (None: a chain as deep as the heads)."""
    from bagel.checkpoint.heads import load_draft_heads

    heads = None
    if heads_dir:
        w = engine.model.llm.embed_tokens.weight
        heads = load_draft_heads(heads_dir, engine.model.cfg.llm, dtype=w.dtype, device=w.device,
                                 llm=engine.model.llm)
    found = heads if heads is not None else getattr(engine.model, "draft_heads", None)
    if found is not None and found.cfg.kind != kind:
        raise ValueError(f"--speculative {kind}, but the draft heads are {found.cfg.kind!r} heads")
    if spec is not None and (spec.budget is not None or spec.depth is not None) and kind != "eagle":
        raise ValueError(f"--tree-budget and --draft-depth are for EAGLE drafters; --speculative {kind} drafts a "
                         "chain as deep as its heads")
    engine.use_speculative(heads, spec)


class Chat:
    def __init__(self, engine, sampling, think: bool):
        self.engine, self.sampling, self.think = engine, sampling, think
        self.reset()

    def reset(self):
        from bagel.inference.engine import VLM_THINK_SYSTEM_PROMPT

        self.session = self.engine.new_sessions(1)
        if self.think:
            self.engine.add_text(self.session, [VLM_THINK_SYSTEM_PROMPT])

    def add_image(self, path: str):
        from bagel.cli.inputs import open_image

        self.engine.add_image(self.session, [open_image(path)], vae=False, vit=True)

    def ask(self, question: str) -> str:
        self.engine.add_text(self.session, [question])
        answer = self.engine.generate_text(self.session, self.sampling)[0][0]
        self.engine.add_text(self.session, [answer])  # keep the turn for follow-up questions
        return answer


def interactive(chat: Chat) -> None:
    print("bagel-chat: type a question; /image PATH adds an image, /reset starts over, /quit exits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
            continue
        if line.startswith("/image "):
            try:
                chat.add_image(line[len("/image "):].strip())
                print("(image added)")
            except USER_ERRORS as e:
                print(f"error: {e}")
            continue
        try:
            print(chat.ask(line))
        except USER_ERRORS as e:
            print(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        from bagel.sampling import SamplingConfig

        from bagel.cli.inputs import open_image

        # every input is checked before the model loads
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        spec = None
        if args.tree_budget is not None or args.draft_depth is not None:
            from bagel.inference.speculative import SpecConfig

            spec = SpecConfig(budget=args.tree_budget, depth=args.draft_depth)  # checked before the model loads
        if args.question is not None and not args.question.strip():
            raise ValueError("--question is empty")
        images = [open_image(path) for path in args.image]
        if args.question is None and not sys.stdin.isatty():
            raise ValueError("no --question, and stdin is not a terminal for an interactive chat: pass "
                             "--question TEXT (with --image PATH to ask about an image)")
        engine = load_engine(args)
        if args.speculative:
            enable_speculative(engine, args.speculative, args.heads, spec)
        chat = Chat(engine, sampling, args.think)
        for image in images:
            chat.engine.add_image(chat.session, [image], vae=False, vit=True)
        if args.question is None:
            interactive(chat)
            return 0
        for message in engine.prompt_warnings(args.question):
            warn("bagel-chat", message)
        answer = chat.ask(args.question)
        if not answer.strip():
            hint = "" if images else "; this model may need an image: --image PATH"
            print(f"bagel-chat: the model gave an empty answer{hint}", file=sys.stderr)
            return 1
        print(answer)
        return 0

    return run(go, "bagel-chat")


if __name__ == "__main__":
    sys.exit(main())
