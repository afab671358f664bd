"""Data cleaner: a class's images ordered by the model's loss; keep, relabel or remove each one."""

from imagelab import run_cli
from imagelab.app_options import app_default_model, app_model, app_parser, from_env

# The bear classifier's: its dataset, from a web image search, is the one that needs cleaning.
MODEL = app_default_model(__file__, "bears")


def main(argv=None):
    parser = app_parser(__doc__, "bears", MODEL)
    data = from_env("CLEANER_DATA")
    parser.add_argument("--data", default=data, required=data is None,
                        help="the dataset folder (one sub-folder per class) to clean; also CLEANER_DATA")
    args = parser.parse_args(argv)
    from imagelab.cleaning import Cleaner
    cleaner = Cleaner(app_model(args.model, "bears", MODEL), args.data)
    import gradio as gr  # not needed for --help or a refused model
    from imagelab.cleaner_ui import cleaner_panel
    from imagelab.ui import launch
    with gr.Blocks(title="Data cleaner") as demo:
        gr.Markdown(f"# Data cleaner\n{__doc__}")
        cleaner_panel(cleaner)
    launch(demo, args.host, args.port, args.mcp)


if __name__ == "__main__":
    run_cli(main)
