"""The data cleaner's Gradio page: a class's images by loss, a keep / relabel / remove choice under each.

The same operations are API endpoints (`list`, `apply`, `undo`, with a prefix in the root app), so a
script can clean through `gradio_client` what a person cleans in the browser.
"""
from pathlib import Path

import gradio as gr

from .paths import CLEANING_LOG, FLAGGED, REMOVED, is_flagged
from .ui import TURNS, user_errors


def choices(record, classes):
    """A class image can go to another class; a flagged one into any class folder, its flagged class's too."""
    if is_flagged(record["file"]):
        return [("keep", "keep"), ("remove", "remove")] + [(f"add to {c}", f"relabel:{c}") for c in classes]
    return [("keep", "keep"), ("remove", "remove")] + [(f"relabel as {c}", f"relabel:{c}")
                                                       for c in classes if c != record["label"]]


def action(record, choice):
    kind, _, to = choice.partition(":")
    return {"file": record["file"], "action": kind, "to": to or None}


def cleaner_api(cleaner, api_prefix=""):
    """The cleaner's operations as API endpoints: `<prefix>list`, `<prefix>apply`, `<prefix>undo`."""

    def list_images(label: str, split: str = "all", limit: int = 0) -> list[dict]:
        """A class's images in a split (valid, train, all, or flagged: those flagged in the apps), highest loss first:
        [{file, label, predicted, probability, loss}]; limit 0 means all of them. Files the page cannot name (not
        UTF-8) are left out, with a warning that says how many."""
        records = user_errors(cleaner.rank)(label, split, limit or None)
        unlisted = cleaner.unlisted(label, split)
        if unlisted:
            gr.Warning(unlisted)
        return records

    def apply(actions: list[dict]) -> list[dict]:
        """Carry out [{file: '<class>/<file>', action: 'keep'|'remove'|'relabel', to: '<class>'}]; returns the
        moves made [{from, to}]. One invalid entry refuses the whole request: nothing moves."""
        return user_errors(cleaner.apply)(actions)

    def undo() -> list[dict]:
        """Move the files of the last applied batch back; returns those moves."""
        return user_errors(cleaner.undo)()

    gr.api(list_images, api_name=f"{api_prefix}list", **TURNS)
    gr.api(apply, api_name=f"{api_prefix}apply", **TURNS)
    gr.api(undo, api_name=f"{api_prefix}undo", **TURNS)


def cleaner_panel(cleaner, api_prefix=""):
    """The cleaner (a `Cleaner`, its model and folder checked when the app started) rendered into the enclosing
    Blocks: a class's images by loss with a choice under each, and the same operations as API endpoints."""
    cleaner_api(cleaner, api_prefix)
    gr.Markdown(f"Cleaning `{cleaner.root}` with `{cleaner.predictor.path}`. Applying moves files to another class "
                f"folder or to `{REMOVED}/`; nothing is deleted, every move is logged in `{CLEANING_LOG}` and can be "
                f"undone. The `{FLAGGED}` split holds the images the apps' visitors flagged as wrongly classified.")
    with gr.Row():
        label = gr.Dropdown(cleaner.classes, value=cleaner.classes[0], label="Class")
        split = gr.Radio(cleaner.splits, value=cleaner.splits[0], label="Split")
        limit = gr.Slider(4, 100, value=24, step=4, label="Images (highest loss first)")
    with gr.Row():
        show = gr.Button("Show", variant="primary")
        undo_button = gr.Button("Undo last apply")
    status = gr.Markdown()
    records = gr.State([])

    def refresh(label, split, limit, message=""):
        ranked = user_errors(cleaner.rank)(label, split)
        recs, unlisted = ranked[:int(limit)], cleaner.unlisted(label, split)
        return (f"{message}{len(recs)} of {len(ranked)} images of **{label}** ({split}), highest loss first."
                + (f" {unlisted}." if unlisted else "")), recs

    show.click(refresh, [label, split, limit], [status, records], api_visibility="private", **TURNS)

    def undo_and_refresh(label, split, limit):
        moves = user_errors(cleaner.undo)()
        return refresh(label, split, limit, f"Undid {len(moves)} move{'s' * (len(moves) != 1)}. ")

    undo_button.click(undo_and_refresh, [label, split, limit], [status, records], api_visibility="private",
                      **TURNS)
    image_grid(cleaner, records, [label, split, limit], status, refresh)


def image_grid(cleaner, records, view, status, refresh):
    """The listed images, each with its keep / remove / relabel choice, and the button that applies them."""

    @gr.render(inputs=records)
    def grid(recs):
        if not recs:
            return
        decisions = []
        with gr.Row():
            for rec in recs:
                with gr.Column(min_width=170, scale=0):
                    gr.Image(cleaner.thumbnail(rec["file"]), height=170, interactive=False, buttons=[],
                             label=f"{rec['predicted']} {rec['probability']:.2f} · loss {rec['loss']:.2f}")
                    name = Path(rec["file"]).name
                    decisions.append(gr.Dropdown(choices(rec, cleaner.classes), value="keep", interactive=True,
                                                 label=f"What to do with {name}", show_label=False, info=name[:28]))
        apply_button = gr.Button("Apply", variant="primary")

        def apply_and_refresh(label, split, limit, *chosen):
            moves = user_errors(cleaner.apply)([action(r, c) for r, c in zip(recs, chosen) if c != "keep"])
            return refresh(label, split, limit, f"Moved {len(moves)} file{'s' * (len(moves) != 1)}. ")

        apply_button.click(apply_and_refresh, [*view, *decisions], [status, records], api_visibility="private",
                           **TURNS)
