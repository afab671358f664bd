"""Autoencoder: upload a photo, see it rebuilt from a code of a few numbers, and walk between two photos' codes."""
from imagelab import run_cli
from imagelab.app_options import app_default_model, app_model, app_parser

MODEL = app_default_model(__file__, "autoencoder")


def main(argv=None):
    args = app_parser(__doc__, "autoencoder", MODEL).parse_args(argv)
    model = app_model(args.model, "autoencoder", MODEL)
    import gradio as gr  # not needed for --help or a refused model
    from imagelab.ui import autoencoder_panel, launch
    with gr.Blocks(title="Autoencoder") as demo:
        gr.Markdown("# Autoencoder\nUpload a photo: it is squeezed into a short code and rebuilt from it.")
        autoencoder_panel(model)
    launch(demo, args.host, args.port, args.mcp)


if __name__ == "__main__":
    run_cli(main)
