"""Caption quality inside a training run: the evaluation split, its captions scored before and after training.

    items = evaluation.load_split("data_vl_eval.json", size=100)
    captions, scores = evaluation.evaluate(model, processor, items, captioning.Recipe("COCO Yes:", 280))
    evaluation.write_results(output_dir, items, {"before": (captions0, scores0), "after": (captions, scores)})

train.py calls `before_training` and `after_training`: the evaluation split captioned and scored each time (printed
and logged), the held-out pictures captioned (printed, and logged to SwanLab), and at the end the scores, the captions
and the page that shows them beside the pictures written to OUTPUT_DIR.

Scores are vlcap/caption_metrics.py's (pycocoevalcap: BLEU-1..4, ROUGE-L, CIDEr), plus the mean caption length in words.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlcap import captioning, fastdecode, formats, gallery
from vlcap.cli import UserError
from vlcap.training_data import usable_conversations

SCORES_FILE, CAPTIONS_FILE = "eval_scores.json", "eval_captions.jsonl"


def load_split(eval_json: str | Path, size: int) -> list[dict]:
    """The first `size` usable conversations of eval_json, or [] (with one line saying why) when there are none to score."""
    if size <= 0:
        return []
    if not Path(eval_json).is_file():
        print(
            f"no evaluation split ({eval_json} does not exist): captions will not be scored. Make one with "
            "`python data2csv.py --split validation --n 100` and "
            "`python csv2json.py --csv coco-2014-val.csv --json data_vl_eval.json`."
        )
        return []
    try:
        return usable_conversations(formats.read_conversations(eval_json), limit=size)
    except UserError as e:  # the scores are optional: the run trains without them, and says which file to fix
        print(
            f"warning: no evaluation split: {e} (--eval-json {eval_json}); captions will not be scored", file=sys.stderr
        )
        return []


def caption_conversations(model, processor, items: list[dict], recipe: captioning.Recipe) -> dict[str, str]:
    """{picture path: caption} for conversations' pictures, in eval mode; an unusable picture is reported and skipped."""
    was_training = model.training
    model.eval()
    paths = [formats.image_of(it) for it in items]
    captions, _ = captioning.caption_paths(
        model, processor, paths, recipe.prompt, recipe.image_size, recipe.batch_size, recipe.max_new_tokens
    )
    fastdecode.release(model)  # its cache is not needed while training, and LoRA would change the captured modules
    model.train(was_training)
    return captions


def evaluate(model, processor, items: list[dict], recipe: captioning.Recipe) -> tuple[dict, dict]:
    """(captions, scores) of the model on the evaluation conversations."""
    # pycocoevalcap (100 MB with its Java tokenizer) is imported only by a run that scores.
    from vlcap.caption_metrics import mean_words, score_captions, tokenizer_for

    captions = caption_conversations(model, processor, items, recipe)
    references = {formats.image_of(it): formats.references_of(it) for it in items}
    scores = score_captions(captions, {p: references[p] for p in captions})
    scores.update(mean_words=mean_words(captions), images=len(captions), tokenizer=tokenizer_for(captions, references))
    return captions, scores


def summary(when: str, scores: dict) -> str:
    numbers = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
    return f"caption quality {when} training ({scores['images']} pictures, {scores['tokenizer']} tokenizer): {numbers}"


def metrics(when: str, scores: dict) -> dict:
    """The scores as SwanLab keys: eval/<when>/<metric>."""
    return {f"eval/{when}/{k}": v for k, v in scores.items() if isinstance(v, float)}


def write_results(output_dir: Path, items: list[dict], results: dict) -> None:
    """OUTPUT_DIR/eval_scores.json (the scores before and after) and eval_captions.jsonl (every caption, both times)."""
    formats.write_json(output_dir / SCORES_FILE, {when: scores for when, (_, scores) in results.items()})
    with formats.atomic_file(output_dir / CAPTIONS_FILE) as f:
        for item in items:
            path = formats.image_of(item)
            record = {
                "image": path,
                **{when: captions.get(path) for when, (captions, _) in results.items()},
                "references": formats.references_of(item),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def before_training(model, data, eval_items: list[dict], recipe: captioning.Recipe, tracker) -> dict:
    """{"before": (captions, scores)} of the evaluation split (none: {}); the held-out pictures' captions to SwanLab.
    `data` is training_data.Data."""
    results = {}
    if eval_items:
        results["before"] = score(model, data.processor, eval_items, recipe, "before", tracker)
    if tracker.enabled:
        tracker.log_pictures("Prediction/before", caption_conversations(model, data.processor, data.test_items, recipe))
    return results


def after_training(model, data, eval_items, recipe, tracker, results: dict, output_dir, marks) -> None:
    """The held-out pictures captioned (a few printed, all logged), then the evaluation split scored and written with
    the scores before (`results`) to OUTPUT_DIR: eval_scores.json, eval_captions.jsonl and the page."""
    captions = caption_conversations(model, data.processor, data.test_items, recipe)
    print_samples(data.test_items, captions)
    tracker.log_pictures("Prediction/after", captions)
    marks("sampled")
    if eval_items:
        results = {**results, "after": score(model, data.processor, eval_items, recipe, "after", tracker)}
        write_page(Path(output_dir), eval_items, results)


def score(model, processor, items: list[dict], recipe: captioning.Recipe, when: str, tracker) -> tuple[dict, dict]:
    """(captions, scores) of the evaluation split, printed and logged as eval/<when>/<metric>."""
    captions, scores = evaluate(model, processor, items, recipe)
    print(summary(when, scores))
    tracker.log(metrics(when, scores))
    return captions, scores


def write_page(output_dir: Path, items: list[dict], results: dict) -> None:
    """The scores and captions before and after (files), and the page that shows them beside the pictures."""
    write_results(output_dir, items, results)
    page = gallery.write_evaluation_page(output_dir / gallery.PAGE_FILE, items, results)
    print(f"the evaluation pictures with their captions before and after training: {page}")


def print_samples(items: list[dict], captions: dict[str, str], most: int = 4) -> None:
    """A few held-out pictures with their reference and generated captions (infer.py captions all of them)."""
    shown = [item for item in items if formats.image_of(item) in captions][:most]
    for item in shown:
        path = formats.image_of(item)
        print(f"{path}\n  reference: {formats.caption_of(item)}\n  generated: {captions[path]}")
    if len(captions) > len(shown):
        print(f"... and {len(captions) - len(shown)} more held-out pictures: `python infer.py` captions them all")
