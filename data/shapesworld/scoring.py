"""ShapesWorld's addition to the generic scorers (``data.scoring``): QA accuracy per question type.

Its records already fit the generic scorers (``meta.task`` is caption / qa / ground / describe, captions list
``meta.objects`` with a ``name``, boxes are ``meta.box`` in pixels); only the breakdown is its own.
"""

from data.scoring import ExactMatch, register_breakdown, register_task

register_breakdown("qa", "qa_type", "qa_by_type")
# long multi-image records (multi.py): short answers, exact match, per question type
register_task("multi", ExactMatch(max_new_tokens=8))
register_breakdown("multi", "multi_type", "multi_by_type")
