//! `fake-kubelet --node N --listen ADDR --cert C --key K`: the fake kubelet
//! of `raven_tests::fake_kubelet`, as a process (for the lab's namespaces).

fn main() {
    raven_tests::fake_kubelet::main_from_args();
}
