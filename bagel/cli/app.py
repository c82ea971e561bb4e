"""bagel-app: a Gradio app over the inference engine: chat, generate, edit and interleave.

    pip install -e ".[app]"
    bagel-app --model path/to/BAGEL-7B-MoT --device cuda --dtype bf16   # the released 7B layout
    bagel-app --model runs/digits/model                                 # the digits demo's model

It serves http://127.0.0.1:7860, i.e. this machine only. --host 0.0.0.0 opens it to the
network, without any authentication.

The generation controls start at the model's defaults (its generation.json, else
bagel.sampling.PRESETS), as bagel-generate and the Python API do. Image sides are multiples of
the model's latent stride, up to its largest size; small outputs are shown enlarged (nearest
neighbour) to at least 256 px by default, adjustable per tab.

Named API endpoints, with named parameters (gradio_client, or view API at the page's foot):
/generate, /edit, /chat, /interleave. One engine serves every tab and its KV cache is shared,
so a lock runs one request at a time. The chat is stateless on the server: each turn rebuilds
the context (image, earlier turns, question), so browser tabs cannot disturb each other.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import threading

from bagel.cli.common import Parser, USER_ERRORS, add_model_args, load_engine, run
from bagel.sampling import AUTO_THRESHOLD, RENORM_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-app", description=__doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves the network (no auth)")
    p.add_argument("--port", type=port_number, default=7860, help="port to serve on")
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
def gen_config(steps, shift, cfg_text, cfg_img, interval_start, interval_end, renorm, renorm_min, cache="off"):
    """The sampler settings of a tab's controls (ImageGenConfig checks every value)."""
    from bagel.sampling import ImageGenConfig

    return ImageGenConfig(num_timesteps=int(steps), timestep_shift=float(shift), cfg_text_scale=float(cfg_text),
                          cfg_img_scale=float(cfg_img), cfg_interval=(float(interval_start), float(interval_end)),
                          cfg_renorm_type=renorm, cfg_renorm_min=float(renorm_min), cache=str(cache or "off"))


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
             on_step=None):
    """-> (image, plan text or "")."""
    from bagel.sampling import SamplingConfig

    if not prompt.strip():
        raise ValueError("type a prompt first")
    images, thoughts = engine.text_to_image([prompt], (int(height), int(width)), cfg, seed=int(seed or 0), think=think,
                                            think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                            on_step=on_step)
    return images[0], (thoughts[0] if thoughts else "")


def edit(engine, image, instruction: str, seed: int, think: bool, max_think_tokens: int, cfg, on_step=None):
    """-> (edited image at the input's resized size, plan text or "")."""
    from bagel.sampling import SamplingConfig

    if image is None:
        raise ValueError("upload an image to edit first")
    if not instruction.strip():
        raise ValueError("type an instruction first")
    images, thoughts = engine.edit([image], [instruction], cfg, seed=int(seed or 0), think=think,
                                   think_sampling=SamplingConfig(max_new_tokens=int(max_think_tokens)),
                                   on_step=on_step)
    return images[0], (thoughts[0] if thoughts else "")


def interleave(engine, prompt: str, image, seed: int, max_blocks: int, cfg, on_step=None) -> tuple[list, list[str]]:
    """Let the model continue after (image,) prompt -> (its images, its texts), in order."""
    if not prompt.strip():
        raise ValueError("type a prompt first")
    inputs = ([image] if image is not None else []) + [prompt]
    outputs = engine.interleave(inputs, max_blocks=int(max_blocks), cfg=cfg, seed=int(seed or 0), on_step=on_step)
    return [o for o in outputs if not isinstance(o, str)], [o for o in outputs if isinstance(o, str)]


# The UI ----------------------------------------------------------------------------------------
def control_values(cfg) -> list:
    """Sampler settings as the values of the guidance controls, in gen_config's argument order."""
    return [cfg.num_timesteps, cfg.timestep_shift, cfg.cfg_text_scale, cfg.cfg_img_scale, *cfg.cfg_interval,
            cfg.cfg_renorm_type, cfg.cfg_renorm_min, str(cfg.cache)]


def guidance_controls(gr, cfg, prefix: str) -> list:
    """Steps, timestep shift and the CFG settings, starting at `cfg`, in gen_config's order."""
    steps, shift, text, img, start, end, renorm, renorm_min, cache = control_values(cfg)
    steps = gr.Slider(2, 100, steps, step=1, label="Steps", elem_id=f"{prefix}-steps",
                      info="timestep grid points; the model runs steps - 1 times")
    with gr.Accordion("Guidance", open=False):
        with gr.Row():
            shift = gr.Slider(0.5, 10.0, shift, step=0.5, label="Timestep shift", info="1 = none")
            text = gr.Slider(1.0, 8.0, text, step=0.1, label="CFG text scale", info="1 = off")
            img = gr.Slider(1.0, 4.0, img, step=0.1, label="CFG image scale", info="1 = off")
        with gr.Row():
            start = gr.Slider(0.0, 1.0, start, step=0.05, label="CFG interval start",
                              info="guide where start < t <= end (t = 1 is noise)")
            end = gr.Slider(0.0, 1.0, end, step=0.05, label="CFG interval end")
            renorm = gr.Dropdown(list(RENORM_TYPES), value=renorm, label="CFG renorm type")
            renorm_min = gr.Slider(0.0, 1.0, renorm_min, step=0.05, label="CFG renorm min")
        cache = gr.Dropdown(["off", "auto", "0.1", "0.2"], value=cache, allow_custom_value=True, label="Step cache",
                            info="skip the decoder for a guidance branch whose input barely changed: off, auto "
                                 f"({AUTO_THRESHOLD}) or a threshold")
    return [steps, shift, text, img, start, end, renorm, renorm_min, cache]


def think_controls(gr, label: str) -> list:
    with gr.Row():
        think = gr.Checkbox(False, label=label)
        max_think = gr.Slider(16, 2048, 1000, step=1, label="Max plan tokens")
    return [think, max_think]


def upscale_control(gr, engine, prefix: str):
    h, w = engine.native_size
    return gr.Slider(0, 16, 0, step=1, label="Display upscale (nearest)", elem_id=f"{prefix}-upscale",
                     info=f"0 = auto: shown at least 256 px (the model draws {w}x{h} px natively)")


def shown(image, upscale: float):
    """`image` enlarged for display: `upscale` times, or (0) just enough to be seen."""
    from bagel.inference.pictures import display_factor, upscale as enlarge

    factor = int(upscale) or display_factor(image.width, image.height)
    return enlarge(image, factor)


class Requests:
    """The endpoint functions: named parameters (the API's names), the engine lock, a progress bar,
    warnings for prompts the model cannot know, and bad input as a message in the UI."""

    def __init__(self, gr, engine):
        self.gr, self.engine, self.lock = gr, engine, threading.Lock()

    def endpoint(self, name: str):
        """The request method `name` as gradio wants it: a gr.Progress default makes gradio pass
        the page's progress bar in (gradio finds it in the signature, as it finds the API names)."""
        import functools

        method = getattr(self, name)
        if "progress" not in inspect.signature(method).parameters:
            return method
        return functools.partial(method, progress=self.gr.Progress())

    def call(self, request):
        try:
            with self.lock:
                return request()
        except USER_ERRORS as e:
            raise self.gr.Error(str(e), print_exception=False) from None

    def warn_unknown(self, text: str) -> None:
        for message in self.engine.prompt_warnings(text):
            self.gr.Warning(message)

    @staticmethod
    def stepper(progress, steps: int):
        """An on_step callback that moves the page's progress bar over the denoising steps."""
        return lambda i, t, x, v: progress((i + 1) / max(1, int(steps) - 1), desc="denoising")

    def generate(self, prompt: str, width: float, height: float, seed: float, think: bool, max_think_tokens: float,
                 steps: float, timestep_shift: float, cfg_text_scale: float, cfg_img_scale: float,
                 cfg_interval_start: float, cfg_interval_end: float, cfg_renorm_type: str, cfg_renorm_min: float,
                 cache: str = "off", upscale: float = 0, progress=None):
        self.warn_unknown(prompt)
        cfg = self.call(lambda: gen_config(steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval_start,
                                           cfg_interval_end, cfg_renorm_type, cfg_renorm_min, cache))
        image, plan = self.call(lambda: generate(self.engine, prompt, width, height, seed, think, max_think_tokens, cfg,
                                                 on_step=None if progress is None else self.stepper(progress, steps)))
        return shown(image, upscale), plan

    def edit(self, image, instruction: str, seed: float, think: bool, max_think_tokens: float, steps: float,
             timestep_shift: float, cfg_text_scale: float, cfg_img_scale: float, cfg_interval_start: float,
             cfg_interval_end: float, cfg_renorm_type: str, cfg_renorm_min: float, cache: str = "off", upscale: float = 0,
             progress=None):
        self.warn_unknown(instruction)
        cfg = self.call(lambda: gen_config(steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval_start,
                                           cfg_interval_end, cfg_renorm_type, cfg_renorm_min, cache))
        edited, plan = self.call(lambda: edit(self.engine, image, instruction, seed, think, max_think_tokens, cfg,
                                              on_step=None if progress is None else self.stepper(progress, steps)))
        return shown(edited, upscale), plan

    def interleave(self, prompt: str, image, seed: float, max_blocks: float, steps: float, timestep_shift: float,
                   cfg_text_scale: float, cfg_img_scale: float, cfg_interval_start: float, cfg_interval_end: float,
                   cfg_renorm_type: str, cfg_renorm_min: float, cache: str = "off", upscale: float = 0,
                   progress=None):
        self.warn_unknown(prompt)
        cfg = self.call(lambda: gen_config(steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval_start,
                                           cfg_interval_end, cfg_renorm_type, cfg_renorm_min, cache))
        images, texts = self.call(lambda: interleave(self.engine, prompt, image, seed, max_blocks, cfg,
                                                     on_step=None if progress is None else self.stepper(progress, steps)))
        if not images and not texts:
            self.gr.Warning("the model ended the turn at once: nothing to show")
        return [shown(im, upscale) for im in images], "\n\n".join(texts)

    def chat(self, image, history: list, question: str, think: bool, max_new_tokens: float, temperature: float,
             top_k: float, top_p: float):
        self.warn_unknown(question)
        answer = self.call(lambda: chat(self.engine, image, history, question, think, max_new_tokens, temperature,
                                        top_k, top_p))
        turns = history + [(question, answer)]
        messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return turns, messages, ""


def chat_tab(gr, requests: Requests) -> None:
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

    inputs = [image, turns, question, think, max_new, temperature, top_k, top_p]
    ask.click(requests.endpoint("chat"), inputs, [turns, chatbot, question], api_name="chat")
    question.submit(requests.endpoint("chat"), inputs, [turns, chatbot, question], api_name=False)
    clear.click(lambda: ([], []), None, [turns, chatbot], api_name=False)


def generate_tab(gr, engine, requests: Requests, default_seed: int) -> None:
    max_px, stride = max_image_px(engine), engine.model.cfg.latent_downsample
    native_h, native_w = engine.native_size
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="t2i-prompt")
            with gr.Row():
                width = gr.Slider(stride, max_px, min(native_w, max_px), step=stride, label="Width",
                                  elem_id="t2i-width")
                height = gr.Slider(stride, max_px, min(native_h, max_px), step=stride, label="Height",
                                   elem_id="t2i-height")
            seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="t2i-seed")
            think = think_controls(gr, "Think first (write a plan, then draw)")
            settings = guidance_controls(gr, engine.defaults.text_to_image, "t2i")
            upscale = upscale_control(gr, engine, "t2i")
            go = gr.Button("Generate", variant="primary", elem_id="t2i-run")
        with gr.Column():
            image = gr.Image(label="Image", format="png", interactive=False, elem_id="t2i-image")
            plan = gr.Textbox(label="Plan (think mode)", interactive=False)
    go.click(requests.endpoint("generate"), [prompt, width, height, seed, *think, *settings, upscale], [image, plan],
             api_name="generate")


def edit_tab(gr, engine, requests: Requests, default_seed: int) -> None:
    with gr.Row():
        with gr.Column():
            source = gr.Image(type="pil", label="Image to edit", elem_id="edit-source")
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
            seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="edit-seed")
            think = think_controls(gr, "Think first")
            settings = guidance_controls(gr, engine.defaults.edit, "edit")
            upscale = upscale_control(gr, engine, "edit")
            run_edit = gr.Button("Edit", variant="primary", elem_id="edit-run")
        with gr.Column():
            edited = gr.Image(label="Edited (the input's size after resizing)", format="png", interactive=False,
                              elem_id="edit-image")
            plan = gr.Textbox(label="Plan (think mode)", interactive=False)
    run_edit.click(requests.endpoint("edit"), [source, instruction, seed, *think, *settings, upscale], [edited, plan],
                   api_name="edit")


def interleave_tab(gr, engine, requests: Requests, default_seed: int) -> None:
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt (the start of the turn)", lines=2, elem_id="il-prompt",
                                placeholder="e.g. Count up from seven:")
            image = gr.Image(type="pil", label="Image before the prompt (optional)", elem_id="il-image")
            seed = gr.Number(default_seed, precision=0, label="Seed", elem_id="il-seed")
            max_blocks = gr.Slider(1, 16, 8, step=1, label="Most outputs (texts + images)")
            gr.Markdown("These settings draw an image while the turn holds no image yet; an image drawn after "
                        "one uses the model's edit settings (their image guidance keeps a chain going).")
            settings = guidance_controls(gr, engine.defaults.text_to_image, "il")
            upscale = upscale_control(gr, engine, "il")
            go = gr.Button("Continue", variant="primary", elem_id="il-run")
        with gr.Column():
            gallery = gr.Gallery(label="Images, in order", elem_id="il-images", format="png")
            texts = gr.Textbox(label="Texts, in order", interactive=False)
    go.click(requests.endpoint("interleave"), [prompt, image, seed, max_blocks, *settings, upscale], [gallery, texts],
             api_name="interleave")


def build_ui(engine, model_name: str = "", default_seed: int = 0):
    import gradio as gr

    requests = Requests(gr, engine)
    max_px, stride = max_image_px(engine), engine.model.cfg.latent_downsample
    with gr.Blocks(title="BAGEL", analytics_enabled=False) as demo:
        gr.Markdown(f"# BAGEL\n`{model_name}`: images up to {max_px}x{max_px} px, sides multiples of {stride}")
        with gr.Tab("Chat", id="chat"):
            chat_tab(gr, requests)
        with gr.Tab("Generate", id="generate"):
            generate_tab(gr, engine, requests, default_seed)
        with gr.Tab("Edit", id="edit"):
            edit_tab(gr, engine, requests, default_seed)
        with gr.Tab("Interleave", id="interleave"):
            interleave_tab(gr, engine, requests, default_seed)
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
