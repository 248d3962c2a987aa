"""Synchronous ("single") tasks: run inside the request at ``/api/v1/single/<type>/``
(docs/single.md). ``registry`` says what each type runs, ``gate`` bounds how many run at once,
``datasets`` stores the files sent with one, ``services`` runs it."""
