"""ShapesWorld's addition to the generic scorers (``data.scoring``): QA accuracy per question type.

Its records already fit the generic scorers (``meta.task`` is caption / qa / ground / describe, captions list
``meta.objects`` with a ``name``, boxes are ``meta.box`` in pixels); only the breakdowns, and the video
scorer (exact match plus the event recall of captions), are its own.
"""

from data.scoring import ExactMatch, object_hits, register_breakdown, register_task

register_breakdown("qa", "qa_type", "qa_by_type")
# long multi-image records (multi.py): short answers, exact match, per question type
register_task("multi", ExactMatch(max_new_tokens=8))
register_breakdown("multi", "multi_type", "multi_by_type")


class VideoScorer(ExactMatch):
    """Clip questions (video.py): exact match for every type; a caption also scores the share of its
    ``meta.events`` phrases it names ("red square moves left"): partial credit exact match cannot give."""

    def score(self, record, prediction, ctx):
        row = super().score(record, prediction, ctx)
        found = (record.get("meta") or {}).get("events")
        if isinstance(found, list) and found:
            row["event_hits"], row["events"] = object_hits(prediction, found), len(found)
        return row

    def metrics(self, task, rows):
        out = super().metrics(task, rows)  # first: the exact match the per-type breakdown reports
        total = sum(r.get("events", 0) for r in rows)
        if total:
            out[f"{task}_caption_event_recall"] = sum(r.get("event_hits", 0) for r in rows) / total
        return out


# clips (video.py): a caption is ~40 tokens, the other answers one word
register_task("video", VideoScorer(max_new_tokens=64))
register_breakdown("video", "video_type", "video_by_type")
