"""Gradio pieces shared by every app: the classifier and autoencoder panels, launching.

A panel takes the model `loading.open_model` opened when the app started, or the path of a model not
trained yet, for which it shows how to train one.
"""
import base64
import functools
import importlib.util
import threading
from pathlib import Path

import gradio as gr
from gradio.data_classes import ImageData
from gradio.processing_utils import save_bytes_to_cache
from gradio_client.utils import is_http_url_like
from pydantic import model_validator

from . import UserError, first_line
from .app_options import cannot_listen, check_listen
from .hub import HF_PREFIX
from .inference import overlay
from .loading import AUTOENCODER, CLASSIFIER, open_model
from .paths import FLAGGED, example_images

# A 24-megapixel photo is ~10 MB as JPEG; anything much bigger is not a photo worth classifying. In bytes: of an
# uploaded file (Gradio refuses a bigger upload), and of one an API caller sends inside the request as a data: URL.
MAX_UPLOAD = 25 * 2**20
# Two requests run at once on a 2-core CPU Space (ONNX Runtime uses the cores within each); the rest wait
# in a bounded queue instead of piling up in memory. Gradio counts them per event: every event that decodes an
# upload or runs a model takes its turn in one group, so that an app's endpoints together run two.
CONCURRENCY, QUEUE_SIZE = 2, 256
TURNS = dict(concurrency_id="model")
# Where a visitor's image can come from: a file, the clipboard (paste), or the camera.
SOURCES = ["upload", "webcam", "clipboard"]
# How many of the classes a classifier panel answers with, most likely first.
TOP = 3
# Gradio shows an image smaller than its frame at its own size: a 64-pixel reconstruction would be a thumbnail in
# the middle of an empty frame. Images marked `pixels` fill their frame instead, with their pixels kept square
# and sharp (no smoothing that would hide what the model got wrong).
CSS = """
.block.pixels .image-frame img, .block.pixels .image-container:fullscreen img {
  object-fit: contain; image-rendering: pixelated;
}
"""


class ImagePayload(ImageData):
    """Gradio's image payload, where what is not one (a bare path or URL string, which gradio_client sends as it is
    without `handle_file`) is an empty one, which `ImageUpload` answers in one line: Gradio's own check fails with
    a generic message and a traceback on the server."""

    @model_validator(mode="before")
    @classmethod
    def empty_unless_a_file(cls, value):
        return value if isinstance(value, dict) else {"path": None, "url": None}


class ImageUpload(gr.Image):
    """`gr.Image` that passes the uploaded file's path on undecoded.

    Gradio would open every upload with PIL first and answer a bad one with a bare "Error"; the app
    decodes it itself (`images.read_image`) and says what is wrong. An image an API caller sends inside the request,
    as a data: URL, Gradio would decode whole and re-encode before any limit of the app's: it is written to a file
    as it came, for the same decoder.
    """
    is_template = True  # rendered by the frontend as a plain Image
    data_model = ImagePayload

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is not None:
            return payload.path
        if (payload.url or "").startswith("data:"):
            return data_url_file(payload.url, self.GRADIO_CACHE)
        # a bare URL string is refused too: Gradio fetches a URL only from a file object, before this runs
        raise gr.Error("no image in the request: send a file or URL through gradio_client's handle_file(path or URL), "
                       'or {"url": ...} holding an http(s) or data:image/...;base64,... URL', print_exception=False)

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        """Gradio fetches an image an API or MCP caller gives as a URL here, before any app code runs, and answers a
        failure with a generic message and a traceback on the server: one line instead."""
        try:
            return await super().async_move_resource_to_block_cache(url_or_file_path)
        except Exception as e:
            if not is_http_url_like(str(url_or_file_path)):
                raise
            raise gr.Error(f"cannot download the image at {url_or_file_path} ({first_line(e)}): send the image "
                           "itself", print_exception=False) from None


class WholeNumber(gr.Slider):
    """`gr.Slider` whose value an API or MCP caller may send as anything: none, text, a number out of its range.
    Gradio's own check fails on the first two with a generic message and prints a traceback for all three; this one
    answers with one line and passes on a whole number."""
    is_template = True  # rendered by the frontend as a plain Slider

    def preprocess(self, payload):
        number = isinstance(payload, (int, float)) and not isinstance(payload, bool)
        if not number or not self.minimum <= payload <= self.maximum:  # NaN is in no range
            shown = repr(payload) if len(repr(payload)) <= 40 else f"{repr(payload)[:40]}..."
            raise gr.Error(f"{self.label.lower()} must be a number from {self.minimum:g} to {self.maximum:g}, not "
                           f"{shown}", print_exception=False)
        return round(payload)


def data_url_file(url, folder):
    """The bytes of a `data:...;base64,...` URL, written as they are to a file in `folder` (its path): refused before
    they are decoded from base64 when they are more than an upload may be, in one line when they are not base64."""
    header, comma, data = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise gr.Error("not a readable image: a data: URL must hold its image in base64 (data:image/png;base64,...)",
                       print_exception=False)
    if len(data) // 4 * 3 > MAX_UPLOAD:
        raise gr.Error(f"image too large: {len(data) // 4 * 3 / 2**20:.1f} MB (limit {MAX_UPLOAD / 2**20:g} MB)",
                       print_exception=False)
    try:
        image = base64.b64decode(data)
    except ValueError as e:  # binascii.Error: bad padding; or characters that are not ASCII
        raise gr.Error(f"not a readable image: the data: URL's base64 is broken ({str(e).split(':')[0]})",
                       print_exception=False) from None
    return save_bytes_to_cache(image, "image.data", folder)


def given(*images):
    """One line for a request that lacks one of `images`, as for a bad upload: an API or MCP caller may send none
    (the page's uploads always hold one)."""
    if any(image is None for image in images):
        raise UserError("upload an image first" if len(images) == 1 else "upload both images first")


class Handoff:
    """What a request's first step computed for an upload, kept for the step Gradio runs after it (`.then`,
    `.success`) so that the model runs once per upload. API calls run only the first step and never take their
    entry: the oldest go once more than `keep` are waiting."""

    def __init__(self, keep=8):
        self.keep, self.waiting, self.lock = keep, {}, threading.Lock()  # requests run in threads of their own

    def put(self, upload, value):
        with self.lock:
            self.waiting[upload] = value
            while len(self.waiting) > self.keep:
                self.waiting.pop(next(iter(self.waiting)))
        return value

    def take(self, upload, compute):
        """The value put for `upload`, or `compute(upload)` when there is none (the first step ran elsewhere)."""
        with self.lock:
            value = self.waiting.pop(upload, None)
        return value or compute(upload)


def on_new_picture(image, examples=None):
    """The listeners that fire once whenever `image` gets another picture: a visitor's (a file, the camera or a
    paste: Gradio's `upload`) or a clicked example's. Not `change`, which Gradio fires twice when one upload
    replaces another (the model would run twice, a bad upload's message show twice), nor `input`, which a paste
    fires twice."""
    return [image.upload] + ([examples.load_input_event.then] if examples else [])


def emptied(outputs):
    """Code run in the browser that empties `outputs`."""
    return f"() => [{', '.join(['null'] * len(outputs))}]"


def listen(listeners, fn, inputs, outputs, api_name, clear=None, then=None):
    """`fn` on each of `listeners` (the first one's is the API endpoint `api_name`, if any), in the app's turns; `then`,
    (fn, outputs), after it succeeds; `clear`: outputs emptied when it fails, so that a bad upload's message is
    not shown beside the last good upload's results."""
    for i, listener in enumerate(listeners):
        public = dict(api_name=api_name) if i == 0 and api_name else dict(api_visibility="private")
        # always_last: a picture given while the last one's run is pending runs next (Gradio's default for an
        # upload drops it, and the panels would show two pictures' results)
        step = listener(fn, inputs, outputs, **public, **TURNS, trigger_mode="always_last")
        if then:
            step.success(then[0], inputs, then[1], api_visibility="private", **TURNS)
        if clear:  # not the failing step's own outputs: Gradio shows its error there, and then clears nothing
            step.failure(None, None, clear, js=emptied(clear))


def missing_model(model_path, train_command):
    gr.Markdown(f"**No model at `{model_path}` yet.** Train one first:\n\n```\n{train_command}\n```\n\n"
                "then restart this app.")


def opened(model, kind, train_command=None):
    """The served object for `model` (opened already, or a path); with `train_command`, None and the training
    instructions rendered for a model not there yet."""
    if not isinstance(model, (str, Path)):
        return model
    if train_command and not str(model).startswith(HF_PREFIX) and not Path(model).exists():
        missing_model(model, train_command)
        return None
    return open_model(model, kind)


def user_errors(fn, name=None, doc=None):
    """`fn` with a UserError shown to the user as a one-line message; its parameters kept for the API.

    `name` and `doc` (default: `fn`'s) are what the MCP server shows: the tool's name and its description,
    with an `Args:` section describing each parameter.
    """
    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
    run.__name__, run.__doc__ = name or fn.__name__, doc or fn.__doc__
    return run


def classifier_panel(model, *, train_command=None, api_name="predict", flag_data=None):
    """Image → the top `TOP` labels, rendered into the enclosing Blocks; `train_command`'s instructions if the model
    (a path) is missing.

    With `flag_data` (a dataset folder) a visitor can flag a wrong answer with the right class, kept in
    `<flag_data>/flagged/<class>/` (`imagelab.flagging`); endpoint `<api_name less predict>flag`.
    """
    clf = opened(model, CLASSIFIER, train_command)
    if clf is None:
        return
    classes = ", ".join(clf.vocab)

    explained = Handoff()  # an upload's labels, view and heatmap, for the heatmap step

    def classify(image):
        given(image)
        if not clf.has_heatmap:
            return clf.predict(image, k=TOP)
        return explained.put(image, clf.explain(image, k=TOP))[0]

    def heatmap(image):  # runs only after `classify` took the image
        if not clf.has_heatmap:
            return None
        _, view, heat = explained.take(image, clf.explain)
        return overlay(view, heat)

    # An AI assistant reads this to decide when to call the tool: it must say what the model can tell apart, and
    # what it gets back from this model.
    n = len(clf.vocab)
    answered = f"the {TOP} most likely classes" if n > TOP else "both classes" if n == 2 else f"all {n} classes"
    doc = (f"Classify an image into one of these classes: {classes}. It recognises only these "
           f"{n} classes and always answers one of them.\n\nArgs:\n    image: the image to classify "
           f"(JPEG, PNG, WEBP, ...)\n\nReturns:\n    the most likely class, and {answered} with their probabilities")
    with gr.Row():
        image = ImageUpload(type="filepath", image_mode=None, sources=SOURCES, label="Image")
        label = gr.Label(num_top_classes=TOP, label="Prediction")
        heat = gr.Image(label="Where it looked (Grad-CAM of the predicted class)", type="pil", interactive=False,
                        visible=clf.has_heatmap)
    if flag_data:
        flag_panel(clf, image, flag_data, api_name.removesuffix("predict") + "flag")
    examples = list(map(str, example_images(clf.path)))
    examples = gr.Examples(examples, inputs=image) if examples else None
    listen(on_new_picture(image, examples), user_errors(classify, api_name, doc), image, label, api_name,
           clear=[heat], then=(user_errors(heatmap), heat))
    image.clear(None, None, [label, heat], js=emptied([label, heat]))
    gr.Markdown(f"Classes: {classes}")


def flag_panel(clf, image, root, api_name):
    """A wrong answer's right class and a button that keeps the image shown for the next training run."""
    from .flagging import Flagger
    flagger = Flagger(root, clf.vocab, held_out=example_images(clf.path))

    def flag(image, label):
        given(image)
        return f"Thanks: kept as `{flagger.flag(image, label)}` for the next training run."

    doc = (f"Report that the model named an image wrongly, giving its right class (one of {', '.join(clf.vocab)}); "
           f"the image is kept for retraining.\n\nArgs:\n    image: the image that was classified wrongly\n"
           f"    label: its right class\n\nReturns:\n    where the image was kept")
    with gr.Row(equal_height=True):
        # any value reaches `flag`, whose check says in one line what is wrong (Gradio's own refusal of a value not
        # in the list logs a traceback)
        right = gr.Dropdown(clf.vocab, value=clf.vocab[0], label="Wrong answer? The right class is", scale=2,
                            allow_custom_value=True)
        button = gr.Button("Flag as wrong", scale=1)
    status = gr.Markdown(label="where the image was kept")  # the name view_api gives what /flag returns
    button.click(user_errors(flag, api_name, doc), [image, right], status, api_name=api_name, **TURNS)
    gr.Markdown(f"Flagged images are kept, as a re-encoded JPEG only, in the owner's dataset folder "
                f"(`{FLAGGED}/<class>/`) for the next training run.")


def classifier_demo(title, description, model, flag_data=None):
    """A standalone classifier app: what `apps/<name>/app.py` serves, endpoints `predict` (and `flag`)."""
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{description}")
        classifier_panel(model, flag_data=flag_data)
    return demo


# PNG: the exact pixels, no webp loss; at the model's size, which `pixels` (CSS) scales up to the frame
SHOWN = dict(type="pil", format="png", height=256, interactive=False, elem_classes=["pixels"])
UPLOAD = dict(type="filepath", image_mode=None, sources=SOURCES)


def autoencoder_panel(model, *, train_command=None, api_prefix=""):
    """Upload → the autoencoder's reconstruction beside PCA's, with both PSNRs; two uploads → the images between
    their codes; `train_command`'s instructions if the model (a path) is missing.

    Endpoints `<api_prefix>reconstruct` (the reconstruction) and `<api_prefix>interpolate` (a strip).
    """
    ae = opened(model, AUTOENCODER, train_command)
    if ae is None:
        return
    examples = list(map(str, example_images(ae.path)))
    gr.Markdown(f"A code of {ae.code_size} numbers per image; the model works at {ae.size}x{ae.size} pixels.")
    reconstruct_panel(ae, examples, api_prefix)
    gr.Markdown("### Between two images\nDecode codes evenly spaced from the first image's code to the second's.")
    interpolate_panel(ae, examples[:2], examples[-2:], api_prefix)


def reconstruct_panel(ae, examples, api_prefix):
    reconstructions = Handoff()  # an upload's Reconstruction, for the comparison step

    def reconstruct(image):
        given(image)
        return reconstructions.put(image, ae.reconstruct(image)).reconstruction

    @user_errors
    def compare(image):  # runs only after `reconstruct` took the image
        r = reconstructions.take(image, ae.reconstruct)
        return r.original, r.pca, (f"**Autoencoder: PSNR {r.psnr:.2f} dB** · PCA with as many components: PSNR "
                                   f"{r.pca_psnr:.2f} dB ({r.psnr - r.pca_psnr:+.2f} dB; all at {ae.size}x{ae.size})")

    # What an AI assistant reads to decide when to call the tool (--mcp), and what it gets back.
    doc = (f"Rebuild an image through an autoencoder: squeeze its centre square into a code of {ae.code_size} numbers "
           f"and decode that code back into an image.\n\nArgs:\n    image: the image to rebuild (JPEG, PNG, WEBP, ...)"
           f"\n\nReturns:\n    the reconstruction, a {ae.size}x{ae.size} PNG")
    with gr.Row():
        image = ImageUpload(label="Image", **UPLOAD)
        original = gr.Image(label="Original (as the model sees it)", **SHOWN)
        rebuilt = gr.Image(label="Autoencoder", **SHOWN)
        pca = gr.Image(label="PCA, same code size", **SHOWN)
    psnr = gr.Markdown()
    listen(on_new_picture(image, gr.Examples(examples, inputs=image) if examples else None),
           user_errors(reconstruct, doc=doc), image, rebuilt, f"{api_prefix}reconstruct", clear=[original, pca, psnr],
           then=(compare, [original, pca, psnr]))
    image.clear(None, None, [rebuilt, original, pca, psnr], js=emptied([rebuilt, original, pca, psnr]))


def interpolate_panel(ae, first, last, api_prefix):
    """Two uploads and a number of steps → the strip between their codes; `first` and `last`: an example pair."""
    def interpolate(a, b, steps):
        given(a, b)
        return ae.interpolate(a, b, steps)

    def interpolate_shown(a, b, steps):  # the page runs it as each image comes: until both are there, no strip
        return None if a is None or b is None else interpolate(a, b, steps)

    doc = (f"Blend two images through an autoencoder: decode codes evenly spaced from the first image's code to the "
           f"second's.\n\nArgs:\n    a: the first image\n    b: the second image\n    steps: how many images, from 3 "
           f"to 12\n\nReturns:\n    one PNG: the {ae.size}x{ae.size} decodings side by side, from the first image to "
           f"the second")
    with gr.Row():
        a, b = ImageUpload(label="From", **UPLOAD), ImageUpload(label="To", **UPLOAD)
        steps = WholeNumber(3, 12, value=8, step=1, label="Steps")
    strip = gr.Image(label="Interpolation", **{**SHOWN, "height": 160})
    pairs = gr.Examples([first, last], inputs=[a, b]) if len(first) == len(last) == 2 else None
    listen([*on_new_picture(a, pairs), b.upload, steps.input], user_errors(interpolate_shown), [a, b, steps], strip,
           api_name=None)
    # The API's endpoint on no event of the page's: the page waits for a pair, and the caller is told what it lacks.
    gr.on([], user_errors(interpolate, doc=doc), [a, b, steps], strip, api_name=f"{api_prefix}interpolate", **TURNS)
    gr.on([a.clear, b.clear], None, None, strip, js=emptied([strip]))


def launch(demo, host, port, mcp=False):
    """Serve `demo` on `host`:`port` (the app's options); with `mcp`, also as an MCP server at /gradio_api/mcp/."""
    if mcp and importlib.util.find_spec("mcp") is None:
        raise UserError("--mcp needs Gradio's MCP extra: pip install 'gradio[mcp]'")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    check_listen(host, port)
    try:
        demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, mcp_server=mcp, css=CSS)
    except OSError as e:  # taken since check_listen; Gradio's message names only the port
        raise cannot_listen(host, port, e) from None
