"""Gradio pieces shared by every app: argument parsing, the classifier and autoencoder panels, launching."""
import argparse
import os
from pathlib import Path

import gradio as gr

from . import UserError
from .paths import examples_dir
from .hub import resolve_model
from .inference import Predictor

# A 24-megapixel photo is ~10 MB as JPEG; anything much bigger is not a photo worth classifying.
MAX_UPLOAD = "25mb"
# Two requests run at once on a 2-core CPU Space (ONNX Runtime uses the cores within each); the rest wait
# in a bounded queue instead of piling up in memory.
CONCURRENCY, QUEUE_SIZE = 2, 256


class ImageUpload(gr.Image):
    """`gr.Image` that passes the uploaded file's path on undecoded.

    Gradio would open every upload with PIL first and answer a bad one with a bare "Error"; the app
    decodes it itself (`images.read_image`) and says what is wrong.
    """
    is_template = True  # rendered by the frontend as a plain Image

    def preprocess(self, payload):
        if payload is not None and payload.path is not None:
            return payload.path
        return super().preprocess(payload)


def app_parser(description, default_model=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if default_model is not None:
        p.add_argument("--model", default=os.environ.get("MODEL_PATH", str(default_model)),
                       help="exported model (.pkl, .onnx, .safetensors or hf://USER/REPO/FILE[@REVISION]); "
                       "also the MODEL_PATH environment variable")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 to share on your network)")
    return p


def default_model(app_file, name, suffix=".onnx"):
    """A Space bundle keeps its model beside app.py (`models/<name><suffix>`); the repository in `models/<name>.pkl`."""
    here = Path(app_file).resolve().parent
    bundled = here / "models" / f"{name}{suffix}"
    return bundled if bundled.exists() else here.parents[1] / "models" / f"{name}.pkl"


def missing_model(model_path, train_command):
    gr.Markdown(f"**No model at `{model_path}` yet.** Train one first:\n\n```\n{train_command}\n```\n\n"
                "then restart this app.")


def classifier_panel(model_path, train_command, api_name="predict"):
    """Upload-an-image → top-3 labels, rendered into the enclosing Blocks; instructions if the model is missing."""
    model_path = resolve_model(model_path)
    if not model_path.is_file():
        return missing_model(model_path, train_command)
    clf = Predictor(model_path)

    def classify(image):
        if image is None:
            return None
        try:
            return clf.predict(image, k=3)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Row():
        image = ImageUpload(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image")
        label = gr.Label(num_top_classes=3, label="Prediction")
    image.change(classify, image, label, api_name=api_name)
    examples = sorted(map(str, examples_dir(model_path).glob("*.jpg")))
    if examples:
        gr.Examples(examples, inputs=image)
    gr.Markdown(f"Classes: {', '.join(clf.vocab)}")


def classifier_demo(title, description, model_path, train_command):
    """A standalone classifier app: what `apps/<name>/app.py` serves, endpoint `predict`."""
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{description}")
        classifier_panel(model_path, train_command)
    return demo


def autoencoder_panel(model_path, train_command, api_prefix=""):
    """Upload → reconstruction with its PSNR; two uploads → the images between their codes.

    Endpoints `<api_prefix>reconstruct` (the reconstruction) and `<api_prefix>interpolate` (a strip).
    """
    if not Path(model_path).is_file():
        return missing_model(model_path, train_command)
    from .autoencoder import Autoencoder  # torch: only apps that serve an autoencoder load it
    ae = Autoencoder(model_path)

    def user_errors(fn):
        def run(*images_and_args):
            try:
                return fn(*images_and_args)
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
        return run

    @user_errors
    def reconstruct(image):
        return None if image is None else ae.reconstruct(image)[1]

    @user_errors
    def compare(image):
        if image is None:
            return None, ""
        original, _, db = ae.reconstruct(image)
        return original, f"**PSNR {db:.2f} dB** (input and reconstruction at {ae.size}x{ae.size})"

    @user_errors
    def interpolate(a, b, steps):
        return None if a is None or b is None else ae.interpolate(a, b, int(steps))

    shown = dict(type="pil", format="png", height=256, interactive=False)  # PNG: the exact pixels, no webp loss
    upload = dict(type="filepath", image_mode=None, sources=["upload", "clipboard"])
    examples = sorted(map(str, examples_dir(model_path).glob("*.jpg")))
    gr.Markdown(f"A code of {ae.model.code_size} numbers per image; the model works at {ae.size}x{ae.size} pixels.")
    with gr.Row():
        image = ImageUpload(label="Image", **upload)
        original = gr.Image(label="Original (as the model sees it)", **shown)
        rebuilt = gr.Image(label="Reconstruction", **shown)
    psnr = gr.Markdown()
    image.change(reconstruct, image, rebuilt, api_name=f"{api_prefix}reconstruct").success(
        compare, image, [original, psnr], api_visibility="private")
    if examples:
        gr.Examples(examples, inputs=image)

    gr.Markdown("### Between two images\nDecode codes evenly spaced from the first image's code to the second's.")
    with gr.Row():
        a, b = ImageUpload(label="From", **upload), ImageUpload(label="To", **upload)
        steps = gr.Slider(3, 12, value=8, step=1, label="Steps")
    strip = gr.Image(label="Interpolation", **{**shown, "height": 160})
    gr.on([a.change, b.change, steps.release], interpolate, [a, b, steps], strip, api_name=f"{api_prefix}interpolate")
    if len(examples) >= 2:
        gr.Examples([examples[:2], examples[-2:]], inputs=[a, b])


def launch(demo, args):
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)
