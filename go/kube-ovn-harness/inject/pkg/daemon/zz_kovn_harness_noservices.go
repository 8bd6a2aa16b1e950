//go:build kovnharness && kovnnoservices

// kube-ovn-ebpf's harness (see zz_kovn_harness.go): v1.13's Controller has no Service lister;
// xtask builds v1.13 with the tag kovnnoservices.

package daemon

import "kube-ovn-ebpf/go/kube-ovn-harness/cluster"

func harnessServices(_ *Controller, _ *cluster.Listers) {}
