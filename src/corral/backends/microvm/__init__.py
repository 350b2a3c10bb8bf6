"""MicroVM mode: sandboxes as VMs under QEMU, Firecracker or Cloud Hypervisor."""
