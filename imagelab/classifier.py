"""The image classifier as a task of the training loop: labelled folders in, a timm classifier out."""
from pathlib import Path

from .data import (check_oxford_names, classifier_dls, contradicting_flags, dataset_split, detect_labels,
                   label_function, no_readable_image, pets_images, split_counts, unknown_flagged,
                   unreadable_classes)
from .export import export_weights_only, learner_config, save_examples, to_onnx
from .inference import CLASSIFIER_OUTPUTS
from .loading import CLASSIFIER
from .models import check_arch, classifier_learner, pretrained_weights
from .paths import FOLDER_SPLIT, artifact_paths
from .reports import classifier_report
from .train import Task, kept_weights

# fine_tune's base_lr (fastai's), and a one-cycle peak from scratch that the ablation kept over 1e-2 (within noise;
# benchmarks/README.md); fastai's own one-cycle default is 1e-3.
FINE_TUNE_LR, SCRATCH_LR = 2e-3, 3e-3


class Classifier(Task):
    kind = CLASSIFIER

    def check(self, cfg):
        check_arch(cfg.arch)
        # With a folder (--data), the weights come before its images are read: offline, one line at once. The default
        # dataset's download comes first and says its own; the learner fetches the weights after it.
        if cfg.pretrained and cfg.data:
            pretrained_weights(cfg.arch)

    def default_data(self):
        return pets_images()

    def dataloaders(self, cfg, root, files, get_x, workers):
        if cfg.labels == "filename":  # asked for, not detected (detect_labels checks the names it reads)
            check_oxford_names(root, files)
        self.labels = cfg.labels or detect_labels(root, files)
        self.get_y = label_function(self.labels, cfg.task)
        missing = unreadable_classes(root, files) if self.labels == "folder" else {}
        if missing:  # its files were each said to be skipped; that the class went with them was not
            print(f"note: {no_readable_image(root, missing)}: not {'a class' if len(missing) == 1 else 'classes'} "
                  "of this model")
        strays = unknown_flagged(root, files, self.get_y)
        if strays:
            classes = sorted({self.get_y(f) for f in strays})
            print(f"note: {len(strays)} flagged images of {', '.join(classes)}, which the dataset has no images of, "
                  f"are left out (such as {Path(strays[0]).relative_to(root)})")
            left_out = set(strays)
            files = [f for f in files if f not in left_out]
        splitter, self.split = dataset_split(root, files, valid_pct=cfg.valid_pct, seed=cfg.seed, cache=cfg.cache)
        dls = classifier_dls(files, self.get_y, splitter=splitter, size=cfg.size, min_scale=cfg.min_scale, bs=cfg.bs,
                             workers=workers, get_x=get_x)
        self.note_contradicting_flags(root, dls.train_ds.items, cfg.cache)
        # What the model will tell apart, and why: a --task given for a folder of class folders has nothing to read
        how = "the folder names" if self.labels == "folder" else f"Oxford-style file names, --task {cfg.task}"
        names = ", ".join(map(str, dls.vocab[:12])) + (f", ... ({len(dls.vocab)})" if len(dls.vocab) > 12 else "")
        print(f"classes from {how}: {names}")
        self.counts = split_counts(dls, self.get_y)
        unmeasured = [c for c, n in self.counts["valid"].items() if n == 0]
        if unmeasured:  # the run goes on, but its report says nothing of these classes
            print(f"note: no held-out images of {', '.join(map(str, unmeasured))} "
                  f"({', '.join(str(self.counts['train'][c]) for c in unmeasured)} in training): the report cannot "
                  f"measure {'it' if len(unmeasured) == 1 else 'them'}; "
                  f"{'add some to valid/' if self.split == FOLDER_SPLIT else 'add photos or raise --valid-pct'}")
        return dls

    def note_contradicting_flags(self, root, training, cache):
        both = contradicting_flags(root, training, self.get_y, cache)
        if both:  # one picture under two labels: the model learns neither well
            (flag, own), rel = both[0], lambda f: Path(f).relative_to(root).as_posix()
            n = len(both)
            print(f"note: {n} flagged {'file looks' if n == 1 else 'files look'} like a training image with another "
                  f"label, and both train "
                  f"(such as {rel(flag)}, {self.get_y(flag)}, like {rel(own)}, {self.get_y(own)}): the cleaner's "
                  "flagged list moves or removes it")

    def learner(self, dls, cfg):
        return classifier_learner(dls, cfg.arch, cfg.pretrained, wd=cfg.wd, label_smoothing=cfg.label_smoothing)

    def default_lr(self, cfg):
        return FINE_TUNE_LR if cfg.pretrained else SCRATCH_LR

    def fits(self, cfg, lr):
        """One one-cycle fit from scratch; fine-tuning has two.

        This is fastai's `fine_tune` spelled out (a frozen epoch at `lr`, then every layer at `lr/2` with
        discriminative rates) so that a resumed run can start inside either fit.
        """
        if not cfg.pretrained:
            return super().fits(cfg, lr)

        def frozen(learn, **kw):
            learn.freeze()
            learn.fit_one_cycle(1, slice(lr), pct_start=0.99, **kw)

        def unfrozen(learn, **kw):
            learn.unfreeze()
            learn.fit_one_cycle(cfg.epochs, slice(lr / 2 / 100, lr / 2), pct_start=0.3, div=5.0, **kw)
        return [(1, frozen), (cfg.epochs, unfrozen)]

    def callbacks(self, cfg):
        from .augment import CutMix, MixUp
        return {"none": [], "mixup": [MixUp()], "cutmix": [CutMix()]}[cfg.mix]

    def report(self, learn, history, folder):
        return classifier_report(learn, history, folder)

    def describe(self, cfg, root, dls):
        return {"task": cfg.task if self.labels == "filename" else "folder names", "labels": self.labels,
                "split": self.split,
                "counts": self.counts}

    def save_examples(self, dls, folder):
        save_examples(dls.valid_ds.items, self.get_y, folder)

    def export(self, learn, model_path):
        config = learner_config(learn)
        export_weights_only(learn.model, config, model_path)
        to_onnx(learn.model, config, artifact_paths(model_path)["onnx"], outputs=CLASSIFIER_OUTPUTS)

    def summary(self, metrics, cfg):
        return (f"accuracy {metrics['accuracy']:.4f} ± {metrics['accuracy_standard_error']:.4f} (averaged with "
                f"mirror images, as predict --tta serves: {metrics['mirror_tta_accuracy']:.4f}; fastai's TTA "
                f"{metrics['tta_accuracy']:.4f}) on "
                f"{sum(metrics['counts']['valid'].values())} held-out images "
                f"with {kept_weights(metrics)}; wrote {cfg.out} and its report")
