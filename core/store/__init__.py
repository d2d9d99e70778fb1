"""The teacher store: its format's only reader and writer (:class:`~core.store.teacher_store.TeacherStore`, in
parts: reading, writing, provenance, consolidation, chunks), its names and codecs (format), the write lock
(locking), the softmax encodings, feature sketches, verification."""
