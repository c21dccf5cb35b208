/* The guest as a 64-bit Xen PV kernel (the same image PVH boots through _start32): the ELF
 * notes Xen's domain builder reads, the PV entry, the hypercall page Xen fills, and the entry
 * stubs of the trap table and the event and failsafe callbacks.
 *
 * Xen enters _start_xen in ring 3 (cs 0xe033) with paging on, the image mapped at its link
 * address (VIRT_BASE = PADDR_OFFSET = 0: virtual = pseudo-physical), rsi = start_info, and
 * events masked. Xen's exception frames start with the interrupted rcx and r11 (its entry used
 * them); the stubs pop them, which leaves the native frame, then build the same IsrContext as
 * boot.s's isr_common, and return with HYPERVISOR_iret, which restores the event mask from the
 * frame's IF. */

    .macro XEN_NOTE type, desc:vararg
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f
    .long 4f - 3f
    .long \type
1:  .asciz "Xen"
2:  .balign 4
3:  \desc
4:  .balign 4
    .popsection
    .endm

    XEN_NOTE 6,  .asciz "pvguest"               /* GUEST_OS */
    XEN_NOTE 7,  .asciz "1"                     /* GUEST_VERSION */
    XEN_NOTE 5,  .asciz "xen-3.0"               /* XEN_VERSION */
    XEN_NOTE 8,  .asciz "generic"               /* LOADER */
    XEN_NOTE 1,  .quad _start_xen               /* ENTRY (e_entry is the 32-bit PVH entry) */
    XEN_NOTE 2,  .quad xen_hypercall_page       /* HYPERCALL_PAGE */
    XEN_NOTE 3,  .quad 0                        /* VIRT_BASE */
    XEN_NOTE 4,  .quad 0                        /* PADDR_OFFSET */
    XEN_NOTE 10, .asciz "!writable_page_tables" /* FEATURES */

    .section .text.xen, "ax"
    .code64
    .global _start_xen
_start_xen:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, boot_tsc(%rip)
    lea boot_stack_top(%rip), %rsp
    mov %rsi, %rdi              /* xen_main(start_info) */
    call xen_main
1:  jmp 1b

    .macro XEN_TRAP vec, err
    .global xen_trap_\vec
xen_trap_\vec:
    pop %rcx
    pop %r11
    .if \err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp xen_common
    .endm

    XEN_TRAP 0, 0
    XEN_TRAP 1, 0
    XEN_TRAP 2, 0
    XEN_TRAP 3, 0
    XEN_TRAP 4, 0
    XEN_TRAP 5, 0
    XEN_TRAP 6, 0
    XEN_TRAP 7, 0
    XEN_TRAP 8, 1
    XEN_TRAP 10, 1
    XEN_TRAP 11, 1
    XEN_TRAP 12, 1
    XEN_TRAP 13, 1
    XEN_TRAP 14, 1
    XEN_TRAP 16, 0
    XEN_TRAP 17, 1
    XEN_TRAP 18, 0
    XEN_TRAP 19, 0

/* The event callback: the same frame without an error code; vector 256 says "event". */
    .global xen_event_entry
xen_event_entry:
    pop %rcx
    pop %r11
    pushq $0
    pushq $256
    jmp xen_common

/* The failsafe callback: Xen could not load a segment register on a return to us. */
    .global xen_failsafe_entry
xen_failsafe_entry:
    lea boot_stack_top(%rip), %rsp
    call xen_failsafe
2:  jmp 2b

xen_common:
    CONTEXT_CALL xen_dispatch   /* boot.s */
    pushq $0                    /* HYPERVISOR_iret's flags: not from a syscall */
    jmp xen_hypercall_page + 23 * 32

/* Runs one model-check case: rdi = struct CaseRegs: gpr[16], rflags, target. Loads every
 * register but rsp and RFLAGS (its arithmetic flags and DF: ring 3 cannot load IF or IOPL),
 * calls `target`, and stores what the registers and RFLAGS are afterwards. */
    .global xen_case_call
xen_case_call:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rdi
    mov 17*8(%rdi), %rax
    mov %rax, xen_case_target(%rip)
    push 16*8(%rdi)
    mov 0*8(%rdi), %rax
    mov 1*8(%rdi), %rcx
    mov 2*8(%rdi), %rdx
    mov 3*8(%rdi), %rbx
    mov 5*8(%rdi), %rbp
    mov 6*8(%rdi), %rsi
    mov 8*8(%rdi), %r8
    mov 9*8(%rdi), %r9
    mov 10*8(%rdi), %r10
    mov 11*8(%rdi), %r11
    mov 12*8(%rdi), %r12
    mov 13*8(%rdi), %r13
    mov 14*8(%rdi), %r14
    mov 15*8(%rdi), %r15
    mov 7*8(%rdi), %rdi
    popfq
    call *xen_case_target(%rip)
    pushfq
    push %rdi
    mov 16(%rsp), %rdi          /* the CaseRegs pointer */
    pop 7*8(%rdi)
    pop 16*8(%rdi)
    mov %rax, 0*8(%rdi)
    mov %rcx, 1*8(%rdi)
    mov %rdx, 2*8(%rdi)
    mov %rbx, 3*8(%rdi)
    mov %rbp, 5*8(%rdi)
    mov %rsi, 6*8(%rdi)
    mov %r8, 8*8(%rdi)
    mov %r9, 9*8(%rdi)
    mov %r10, 10*8(%rdi)
    mov %r11, 11*8(%rdi)
    mov %r12, 12*8(%rdi)
    mov %r13, 13*8(%rdi)
    mov %r14, 14*8(%rdi)
    mov %r15, 15*8(%rdi)
    pop %rdi
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* Xen writes one 32-byte stub per hypercall here before entry (HYPERCALL_PAGE note); under
 * PVH the page is never called. */
    .section .xen_hypercall, "ax"
    .balign 4096
    .global xen_hypercall_page
xen_hypercall_page:
    .fill 4096, 1, 0xcc

    .section .bss.xen, "aw", @nobits
    .balign 8
xen_case_target: .skip 8
