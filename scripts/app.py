"""Gradio app over the inference engine: chat (image understanding), generate (text to image), edit.

    pip install -e ".[app]"
    python scripts/app.py --model path/to/BAGEL-7B-MoT --device cuda --dtype bf16  # the released 7B layout
    python scripts/app.py --model tests/assets/bagel_official_tiny   # CPU smoke run (random weights: noise)

It serves http://127.0.0.1:7860, i.e. this machine only. `--host 0.0.0.0` opens it to the network,
without any authentication. The model arguments are those of bagel-generate / bagel-chat.

The generation settings are controls that start at the official defaults: text-to-image cfg-text
4, cfg-img 1, interval 0.4..1, global renorm; editing 4, 2, 0..1, text_channel; shift 3, 50 steps.
Image sides are multiples of 16 px, up to the model's max_latent_size x 16.
One engine serves every tab and its KV cache is shared, so a lock runs one request at a time.
The chat is stateless on the server: each turn rebuilds the context (image, earlier turns,
question) and answers it, so browser tabs cannot disturb each other's conversations.
"""

from __future__ import annotations

import argparse
import sys
import threading

from bagel.cli.common import add_model_args, load_engine, run
from bagel.flow import RENORM_TYPES

T2I_DEFAULTS = dict(cfg_text=4.0, cfg_img=1.0, interval=(0.4, 1.0), renorm="global")
EDIT_DEFAULTS = dict(cfg_text=4.0, cfg_img=2.0, interval=(0.0, 1.0), renorm="text_channel")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves the network (no auth)")
    p.add_argument("--port", type=int, default=7860)
    return p


def max_image_px(engine) -> int:
    cfg = engine.model.cfg
    return cfg.max_latent_size * cfg.latent_downsample


# Requests: plain functions of the engine (the UI adds the lock, progress and error display) ----
def gen_config(steps, shift, cfg_text, cfg_img, interval_start, interval_end, renorm, renorm_min):
    from bagel.inference.generate_image import ImageGenConfig

    if not 0.0 <= interval_start <= interval_end <= 1.0:
        raise ValueError(f"the CFG interval must satisfy 0 <= start <= end <= 1, got {interval_start}..{interval_end}")
    return ImageGenConfig(num_timesteps=int(steps), timestep_shift=float(shift), cfg_text_scale=float(cfg_text),
                          cfg_img_scale=float(cfg_img), cfg_interval=(float(interval_start), float(interval_end)),
                          cfg_renorm_type=renorm, cfg_renorm_min=float(renorm_min))


def chat(engine, image, turns: list[tuple[str, str]], question: str, think: bool, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float) -> str:
    """Answer `question` about `image` (or none) after the earlier (question, answer) turns."""
    from bagel.inference.engine import VLM_THINK_SYSTEM_PROMPT
    from bagel.inference.generate_text import SamplingConfig

    if not question.strip():
        raise ValueError("type a question first")
    s = engine.new_sessions(1)
    if think:
        engine.add_text(s, [VLM_THINK_SYSTEM_PROMPT])
    if image is not None:
        engine.add_image(s, [image], vae=False, vit=True)
    for q, a in turns:  # the answers go back into the context, as in bagel-chat's interactive mode
        engine.add_text(s, [q])
        engine.add_text(s, [a])
    engine.add_text(s, [question])
    sampling = SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p))
    return engine.generate_text(s, sampling)[0][0]


def generate(engine, prompt: str, width: int, height: int, seed: int, think: bool, max_think_tokens: int, cfg,
             progress: bool = False):
    """-> (image, plan text or "")."""
    from bagel.inference.generate_text import SamplingConfig

    if not prompt.strip():
        raise ValueError("type a prompt first")
    images, thoughts = engine.text_to_image([prompt], (int(height), int(width)), cfg, seed=int(seed or 0), think=think,
                                            think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                            progress=progress)
    return images[0], (thoughts[0] if thoughts else "")


def edit(engine, image, instruction: str, seed: int, think: bool, max_think_tokens: int, cfg, progress: bool = False):
    """-> (edited image at the input's resized size, plan text or "")."""
    from bagel.inference.generate_text import SamplingConfig

    if image is None:
        raise ValueError("upload an image to edit first")
    if not instruction.strip():
        raise ValueError("type an instruction first")
    images, thoughts = engine.edit([image], [instruction], cfg, seed=int(seed or 0), think=think,
                                   think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                   progress=progress)
    return images[0], (thoughts[0] if thoughts else "")


# The UI ----------------------------------------------------------------------------------------
def guidance_controls(gr, d: dict) -> list:
    """Timestep shift and the CFG settings, in ImageGenConfig's order after the step count."""
    with gr.Accordion("Guidance", open=False):
        with gr.Row():
            shift = gr.Slider(1.0, 10.0, 3.0, step=0.5, label="Timestep shift")
            cfg_text = gr.Slider(1.0, 8.0, d["cfg_text"], step=0.1, label="CFG text scale")
            cfg_img = gr.Slider(1.0, 4.0, d["cfg_img"], step=0.1, label="CFG image scale")
        with gr.Row():
            start = gr.Slider(0.0, 1.0, d["interval"][0], step=0.05, label="CFG interval start",
                              info="guide where start < t <= end (t = 1 is noise)")
            end = gr.Slider(0.0, 1.0, d["interval"][1], step=0.05, label="CFG interval end")
            renorm = gr.Dropdown(list(RENORM_TYPES), value=d["renorm"], label="CFG renorm type")
            renorm_min = gr.Slider(0.0, 1.0, 0.0, step=0.05, label="CFG renorm min")
    return [shift, cfg_text, cfg_img, start, end, renorm, renorm_min]


def build_ui(engine, model_name: str = "", default_seed: int = 0):
    import gradio as gr

    lock = threading.Lock()
    max_px = max_image_px(engine)
    stride = engine.model.cfg.latent_downsample

    def call(request):
        """Run one request under the engine lock; bad input becomes a message in the UI."""
        try:
            with lock:
                return request()
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e

    def on_chat(image, turns, question, think, max_new_tokens, temperature, top_k, top_p):
        answer = call(lambda: chat(engine, image, turns, question, think, max_new_tokens, temperature, top_k, top_p))
        turns = turns + [(question, answer)]
        messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return turns, messages, ""

    # gr.Progress(track_tqdm=True) shows the engine's tqdm bar over the denoising steps
    def on_generate(prompt, width, height, steps, seed, think, max_think, *guidance,
                    progress=gr.Progress(track_tqdm=True)):
        return call(lambda: generate(engine, prompt, width, height, seed, think, max_think,
                                     gen_config(steps, *guidance), progress=True))

    def on_edit(image, instruction, steps, seed, think, max_think, *guidance, progress=gr.Progress(track_tqdm=True)):
        return call(lambda: edit(engine, image, instruction, seed, think, max_think, gen_config(steps, *guidance),
                                 progress=True))

    with gr.Blocks(title="BAGEL", analytics_enabled=False) as demo:
        gr.Markdown(f"# BAGEL\n`{model_name}`: images up to {max_px}x{max_px} px, sides multiples of {stride}")
        with gr.Tab("Chat", id="chat"):
            turns = gr.State([])
            with gr.Row():
                with gr.Column(scale=1):
                    chat_image = gr.Image(type="pil", label="Image (optional)", elem_id="chat-image")
                    chat_think = gr.Checkbox(False, label="Think first (<think> ... </think>)")
                    with gr.Accordion("Sampling", open=False):
                        max_new = gr.Slider(1, 2048, 512, step=1, label="Max new tokens")
                        temperature = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="Temperature", info="0 = greedy")
                        top_k = gr.Slider(0, 200, 0, step=1, label="Top-k", info="0 = off")
                        top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="Top-p", info="1 = off")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Conversation", elem_id="chat-log")
                    question = gr.Textbox(label="Question", lines=2, elem_id="chat-question")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="chat-run")
                        clear = gr.Button("New conversation")
            chat_inputs = [chat_image, turns, question, chat_think, max_new, temperature, top_k, top_p]
            ask.click(on_chat, chat_inputs, [turns, chatbot, question])
            question.submit(on_chat, chat_inputs, [turns, chatbot, question])
            clear.click(lambda: ([], []), None, [turns, chatbot])

        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="t2i-prompt")
                    with gr.Row():
                        side = min(1024, max_px)
                        width = gr.Slider(stride, max_px, side, step=stride, label="Width", elem_id="t2i-width")
                        height = gr.Slider(stride, max_px, side, step=stride, label="Height", elem_id="t2i-height")
                    with gr.Row():
                        steps = gr.Slider(2, 100, 50, step=1, label="Steps", elem_id="t2i-steps",
                                          info="timestep grid points; the model runs steps - 1 times")
                        seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="t2i-seed")
                    with gr.Row():
                        think = gr.Checkbox(False, label="Think first (write a plan, then draw)")
                        max_think = gr.Slider(16, 2048, 1000, step=1, label="Max plan tokens")
                    guidance = guidance_controls(gr, T2I_DEFAULTS)
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    image = gr.Image(label="Image", format="png", interactive=False, elem_id="t2i-image")
                    plan = gr.Textbox(label="Plan (think mode)", interactive=False)
            go.click(on_generate, [prompt, width, height, steps, seed, think, max_think, *guidance], [image, plan])

        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(type="pil", label="Image to edit", elem_id="edit-source")
                    instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
                    with gr.Row():
                        e_steps = gr.Slider(2, 100, 50, step=1, label="Steps", elem_id="edit-steps")
                        e_seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="edit-seed")
                    with gr.Row():
                        e_think = gr.Checkbox(False, label="Think first")
                        e_max_think = gr.Slider(16, 2048, 1000, step=1, label="Max plan tokens")
                    e_guidance = guidance_controls(gr, EDIT_DEFAULTS)
                    e_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                with gr.Column():
                    edited = gr.Image(label="Edited (the input's size after resizing)", format="png",
                                      interactive=False, elem_id="edit-image")
                    e_plan = gr.Textbox(label="Plan (think mode)", interactive=False)
            e_run.click(on_edit, [source, instruction, e_steps, e_seed, e_think, e_max_think, *e_guidance],
                        [edited, e_plan])
    return demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('app.py: error: gradio is not installed; pip install -e ".[app]"', file=sys.stderr)
        return 2

    def serve():
        engine = load_engine(args)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"app.py: serving on {args.host}: anyone who can reach it can use the model", file=sys.stderr)
        demo = build_ui(engine, args.model, args.seed)
        demo.queue().launch(server_name=args.host, server_port=args.port, show_error=True)

    return run(serve, "app.py")


if __name__ == "__main__":
    sys.exit(main())
