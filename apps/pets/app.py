"""Pet classifier: upload a photo, get the top-3 labels (cat or dog, or the 37 Oxford-IIIT Pet breeds)."""
from imagelab import run_cli
from imagelab.app_options import app_default_model, app_model, app_parser

MODEL = app_default_model(__file__, "pets")


def main(argv=None):
    args = app_parser(__doc__, "pets", MODEL, flagging=True).parse_args(argv)
    model = app_model(args.model, "pets", MODEL)
    from imagelab.ui import classifier_demo, launch  # gradio: not needed for --help or a refused model
    demo = classifier_demo("Pet classifier", "Upload a photo of a cat or a dog.", model, args.flag_data)
    launch(demo, args.host, args.port, args.mcp)


if __name__ == "__main__":
    run_cli(main)
