"""ShapesWorld's addition to the generic scorers (``data.scoring``): QA accuracy per question type.

Its records already fit the generic scorers (``meta.task`` is caption / qa / ground / describe, captions list
``meta.objects`` with a ``name``, boxes are ``meta.box`` in pixels); only the breakdown is its own.
"""

from data.scoring import register_breakdown

register_breakdown("qa", "qa_type", "qa_by_type")
