"""ACPI for kvmpy machines: an AML encoder (:mod:`.aml`)."""
