"""Every kind of teacher behind one interface, and the online target source."""
