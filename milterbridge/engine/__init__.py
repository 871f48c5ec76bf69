"""Pure merge logic: verdicts, the header model, edit scripts. Imports nothing that does I/O."""
