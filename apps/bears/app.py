"""Bear classifier: upload a photo, get the top-3 labels (grizzly, black or teddy bear)."""
from imagelab import run_cli
from imagelab.app_options import app_default_model, app_model, app_parser

MODEL = app_default_model(__file__, "bears")


def main(argv=None):
    args = app_parser(__doc__, "bears", MODEL, flagging=True).parse_args(argv)
    model = app_model(args.model, "bears", MODEL)
    from imagelab.ui import classifier_demo, launch  # gradio: not needed for --help or a refused model
    demo = classifier_demo("Bear classifier", "Upload a photo of a grizzly, a black bear or a teddy bear.", model,
                           args.flag_data)
    launch(demo, args.host, args.port, args.mcp)


if __name__ == "__main__":
    run_cli(main)
