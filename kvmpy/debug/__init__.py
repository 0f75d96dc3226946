"""L3 tools: seeing inside a guest: the gdb remote stub (gdbstub.py) and exit and step traces
with record and replay (trace.py). They receive a Machine or a vCPU loop and never import
vmm/. The disassembler they use is x86/disasm.py (capstone, imported on first use)."""
