"""Every kind of teacher behind one interface, and the online target source.

``base`` holds the interface (:class:`~core.teachers.base.TeacherKind`), the table of kinds and the calls that
dispatch through it (``load_teacher``, ``teacher_outputs``, ``check_teacher_windows``, ``teacher_entry_fields``).
Importing this package registers every kind: ``registry`` and ``own_preprocessing`` (``network``), ``bundle``
(``bundle``) and ``nnunet`` (``nnunet``). ``own_inputs`` reads a case the teacher's own way; ``grid`` resamples a
teacher's outputs onto the store's grid; ``online`` computes targets with teachers in memory (stage 2).
"""

from __future__ import annotations

from core.teachers import bundle, network, nnunet  # registration: each kind module registers itself

__all__ = ["bundle", "network", "nnunet"]
