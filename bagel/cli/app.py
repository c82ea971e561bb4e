"""Gradio app over the inference engine: chat (image understanding), generate (text to image), edit.

    pip install -e ".[app]"
    bagel-app --model path/to/BAGEL-7B-MoT --device cuda --dtype bf16  # the released 7B layout
    bagel-app --model tests/assets/bagel_official_tiny   # CPU smoke run (random weights: noise)

It serves http://127.0.0.1:7860, i.e. this machine only. `--host 0.0.0.0` opens it to the network,
without any authentication. The model arguments are those of bagel-generate / bagel-chat.

The generation settings are controls that start at the model's defaults, as the CLI and the
Python API do (its generation.json, else bagel.sampling.PRESETS).
Image sides are multiples of 16 px, up to the model's max_latent_size x 16.
One engine serves every tab and its KV cache is shared, so a lock runs one request at a time.
The chat is stateless on the server: each turn rebuilds the context (image, earlier turns,
question) and answers it, so browser tabs cannot disturb each other's conversations.
"""

from __future__ import annotations

import argparse
import sys
import threading

from bagel.cli.common import Parser, USER_ERRORS, add_model_args, load_engine, run
from bagel.flow import RENORM_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-app", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves the network (no auth)")
    p.add_argument("--port", type=port_number, default=7860)
    return p


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port {text!r}: expected a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port {port}: must be in 1..65535")
    return port


def max_image_px(engine) -> int:
    cfg = engine.model.cfg
    return cfg.max_latent_size * cfg.latent_downsample


# Requests: plain functions of the engine (the UI adds the lock, progress and error display) ----
def gen_config(steps, shift, cfg_text, cfg_img, interval_start, interval_end, renorm, renorm_min):
    """The sampler settings of a tab's controls (ImageGenConfig checks every value)."""
    from bagel.sampling import ImageGenConfig

    return ImageGenConfig(num_timesteps=int(steps), timestep_shift=float(shift), cfg_text_scale=float(cfg_text),
                          cfg_img_scale=float(cfg_img), cfg_interval=(float(interval_start), float(interval_end)),
                          cfg_renorm_type=renorm, cfg_renorm_min=float(renorm_min))


def chat(engine, image, turns: list[tuple[str, str]], question: str, think: bool, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float) -> str:
    """Answer `question` about `image` (or none) after the earlier (question, answer) turns."""
    from bagel.inference.engine import VLM_THINK_SYSTEM_PROMPT
    from bagel.sampling import SamplingConfig

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
    from bagel.sampling import SamplingConfig

    if not prompt.strip():
        raise ValueError("type a prompt first")
    images, thoughts = engine.text_to_image([prompt], (int(height), int(width)), cfg, seed=int(seed or 0), think=think,
                                            think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                            progress=progress)
    return images[0], (thoughts[0] if thoughts else "")


def edit(engine, image, instruction: str, seed: int, think: bool, max_think_tokens: int, cfg, progress: bool = False):
    """-> (edited image at the input's resized size, plan text or "")."""
    from bagel.sampling import SamplingConfig

    if image is None:
        raise ValueError("upload an image to edit first")
    if not instruction.strip():
        raise ValueError("type an instruction first")
    images, thoughts = engine.edit([image], [instruction], cfg, seed=int(seed or 0), think=think,
                                   think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                   progress=progress)
    return images[0], (thoughts[0] if thoughts else "")


# The UI ----------------------------------------------------------------------------------------
def control_values(cfg) -> list:
    """Sampler settings as the values of the guidance controls, in gen_config's argument order."""
    return [cfg.num_timesteps, cfg.timestep_shift, cfg.cfg_text_scale, cfg.cfg_img_scale, *cfg.cfg_interval,
            cfg.cfg_renorm_type, cfg.cfg_renorm_min]


def guidance_controls(gr, cfg, prefix: str) -> list:
    """Steps, timestep shift and the CFG settings, starting at `cfg`, in gen_config's order."""
    steps, shift, text, img, start, end, renorm, renorm_min = control_values(cfg)
    steps = gr.Slider(2, 100, steps, step=1, label="Steps", elem_id=f"{prefix}-steps",
                      info="timestep grid points; the model runs steps - 1 times")
    with gr.Accordion("Guidance", open=False):
        with gr.Row():
            shift = gr.Slider(0.5, 10.0, shift, step=0.5, label="Timestep shift")
            text = gr.Slider(1.0, 8.0, text, step=0.1, label="CFG text scale")
            img = gr.Slider(1.0, 4.0, img, step=0.1, label="CFG image scale")
        with gr.Row():
            start = gr.Slider(0.0, 1.0, start, step=0.05, label="CFG interval start",
                              info="guide where start < t <= end (t = 1 is noise)")
            end = gr.Slider(0.0, 1.0, end, step=0.05, label="CFG interval end")
            renorm = gr.Dropdown(list(RENORM_TYPES), value=renorm, label="CFG renorm type")
            renorm_min = gr.Slider(0.0, 1.0, renorm_min, step=0.05, label="CFG renorm min")
    return [steps, shift, text, img, start, end, renorm, renorm_min]


def think_controls(gr, label: str) -> list:
    with gr.Row():
        think = gr.Checkbox(False, label=label)
        max_think = gr.Slider(16, 2048, 1000, step=1, label="Max plan tokens")
    return [think, max_think]


def chat_tab(gr, engine, call) -> None:
    turns = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="pil", label="Image (optional)", elem_id="chat-image")
            think = gr.Checkbox(False, label="Think first (<think> ... </think>)")
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

    def on_chat(image, turns, question, think, max_new_tokens, temperature, top_k, top_p):
        answer = call(lambda: chat(engine, image, turns, question, think, max_new_tokens, temperature, top_k, top_p))
        turns = turns + [(question, answer)]
        messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return turns, messages, ""

    inputs = [image, turns, question, think, max_new, temperature, top_k, top_p]
    ask.click(on_chat, inputs, [turns, chatbot, question])
    question.submit(on_chat, inputs, [turns, chatbot, question])
    clear.click(lambda: ([], []), None, [turns, chatbot])


def generate_tab(gr, engine, call, default_seed: int) -> None:
    max_px, stride = max_image_px(engine), engine.model.cfg.latent_downsample
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="t2i-prompt")
            with gr.Row():
                side = min(1024, max_px)
                width = gr.Slider(stride, max_px, side, step=stride, label="Width", elem_id="t2i-width")
                height = gr.Slider(stride, max_px, side, step=stride, label="Height", elem_id="t2i-height")
            seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="t2i-seed")
            think = think_controls(gr, "Think first (write a plan, then draw)")
            settings = guidance_controls(gr, engine.defaults.text_to_image, "t2i")
            go = gr.Button("Generate", variant="primary", elem_id="t2i-run")
        with gr.Column():
            image = gr.Image(label="Image", format="png", interactive=False, elem_id="t2i-image")
            plan = gr.Textbox(label="Plan (think mode)", interactive=False)

    # gr.Progress(track_tqdm=True) shows the engine's tqdm bar over the denoising steps
    def on_generate(prompt, width, height, seed, think, max_think, *settings, progress=gr.Progress(track_tqdm=True)):
        return call(lambda: generate(engine, prompt, width, height, seed, think, max_think, gen_config(*settings),
                                     progress=True))

    go.click(on_generate, [prompt, width, height, seed, *think, *settings], [image, plan])


def edit_tab(gr, engine, call, default_seed: int) -> None:
    with gr.Row():
        with gr.Column():
            source = gr.Image(type="pil", label="Image to edit", elem_id="edit-source")
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
            seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="edit-seed")
            think = think_controls(gr, "Think first")
            settings = guidance_controls(gr, engine.defaults.edit, "edit")
            run_edit = gr.Button("Edit", variant="primary", elem_id="edit-run")
        with gr.Column():
            edited = gr.Image(label="Edited (the input's size after resizing)", format="png", interactive=False,
                              elem_id="edit-image")
            plan = gr.Textbox(label="Plan (think mode)", interactive=False)

    def on_edit(image, instruction, seed, think, max_think, *settings, progress=gr.Progress(track_tqdm=True)):
        return call(lambda: edit(engine, image, instruction, seed, think, max_think, gen_config(*settings),
                                 progress=True))

    run_edit.click(on_edit, [source, instruction, seed, *think, *settings], [edited, plan])


def build_ui(engine, model_name: str = "", default_seed: int = 0):
    import gradio as gr

    lock = threading.Lock()

    def call(request):
        """Run one request under the engine lock; bad input becomes a message in the UI."""
        try:
            with lock:
                return request()
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from e

    max_px, stride = max_image_px(engine), engine.model.cfg.latent_downsample
    with gr.Blocks(title="BAGEL", analytics_enabled=False) as demo:
        gr.Markdown(f"# BAGEL\n`{model_name}`: images up to {max_px}x{max_px} px, sides multiples of {stride}")
        with gr.Tab("Chat", id="chat"):
            chat_tab(gr, engine, call)
        with gr.Tab("Generate", id="generate"):
            generate_tab(gr, engine, call, default_seed)
        with gr.Tab("Edit", id="edit"):
            edit_tab(gr, engine, call, default_seed)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('bagel-app: error: gradio is not installed; pip install -e ".[app]"', file=sys.stderr)
        return 2

    def serve():
        engine = load_engine(args)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"bagel-app: serving on {args.host}: anyone who can reach it can use the model", file=sys.stderr)
        demo = build_ui(engine, args.model, args.seed)
        demo.queue().launch(server_name=args.host, server_port=args.port, show_error=True)

    return run(serve, "bagel-app")


if __name__ == "__main__":
    sys.exit(main())
