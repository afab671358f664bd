"""The exported `.pkl` works the way every fastai user calls it: `load_learner`, then `learn.predict(...)`."""
import textwrap

from gradio_client import handle_file

from conftest import Client, ROOT, run, served, write_image

# The fastai course's Hugging Face Space app (lesson 2), as students write it.
COURSE_APP = """
from fastai.vision.all import *
import gradio as gr

learn = load_learner("model.pkl")
categories = learn.dls.vocab

def classify_image(img):
    pred, idx, probs = learn.predict(img)
    return dict(zip(categories, map(float, probs)))

image = gr.Image(type="pil")
label = gr.Label()
intf = gr.Interface(fn=classify_image, inputs=image, outputs=label)
intf.launch()
"""

INPUTS = {  # what a course notebook or app hands to learn.predict
    "str": "sys.argv[2]",
    "Path": "Path(sys.argv[2])",
    "PIL image": "Image.open(sys.argv[2])",
    "PILImage.create": "PILImage.create(sys.argv[2])",
    "bytes": "open(sys.argv[2], 'rb').read()",
    "array": "np.asarray(Image.open(sys.argv[2]).convert('RGB'))",
}


def predict_code(inputs, show):
    """Code that loads the learner sys.argv[1] and prints `show` of learn.predict for each of `inputs` on sys.argv[2]."""
    calls = "".join(f"    print({name!r}, {show.format(out=f'learn.predict({INPUTS[name]})')})\n" for name in inputs)
    return textwrap.dedent("""
        import sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from fastai.vision.all import PILImage, load_learner
        learn = load_learner(sys.argv[1])
        with learn.no_bar():
    """) + calls + "print('done')\n"


def test_classifier_predicts_what_a_course_learner_takes(tiny_model, tmp_path):
    img = write_image(tmp_path / "photo.jpg", (220, 60, 60), size=(90, 70))
    res = run(["-c", predict_code(INPUTS, "{out}[0]"), tiny_model, img], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    answers = dict(line.rsplit(" ", 1) for line in res.stdout.splitlines()[:-1])
    assert set(answers) == set(INPUTS)
    assert set(answers.values()) <= {"cats", "dogs"}


def test_published_files_carry_no_path_of_the_trainers_disk(tiny_model, tiny_autoencoder):
    """The learner and the ONNX graphs go to the Hub: no path of this checkout or of its Python packages in them
    (fastai's image block pickled a function by value with its file's path; the exporter notes Python stacks)."""
    for model in (tiny_model, tiny_autoencoder):
        for f in [model, *model.parent.glob(f"{model.stem}*.onnx")]:
            data = f.read_bytes()  # torch.save's zip stores the pickle uncompressed
            assert str(ROOT).encode() not in data and b"site-packages" not in data, f


def test_autoencoder_predicts_what_a_course_learner_takes(tiny_autoencoder, tmp_path):
    img = write_image(tmp_path / "photo.png", (200, 90, 40), size=(60, 30))
    inputs = ["str", "PIL image", "PILImage.create"]
    res = run(["-c", predict_code(inputs, "tuple({out}[0].shape)"), tiny_autoencoder, img], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[:-1] == [f"{name} (3, 16, 16)" for name in inputs]


def test_the_course_space_app_serves_an_exported_classifier(tiny_model, tmp_path):
    (tmp_path / "model.pkl").write_bytes(tiny_model.read_bytes())
    (tmp_path / "app.py").write_text(COURSE_APP)
    with served([tmp_path / "app.py"], cwd=tmp_path) as url:
        out = Client(url, verbose=False).predict(handle_file(str(write_image(tmp_path / "x.jpg", (60, 60, 220)))),
                                                 api_name="/classify_image")  # Gradio 6 names the endpoint after the function
    assert {c["label"] for c in out["confidences"]} == {"cats", "dogs"}
