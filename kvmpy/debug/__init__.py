"""L3: seeing inside a guest: the gdb remote stub (gdbstub.py), exit and step traces with
record and replay (trace.py) and the disassembler (disasm.py, capstone, imported on use)."""
