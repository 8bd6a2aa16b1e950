//go:build kovnharness && kovnlegacy

// kube-ovn-ebpf's harness (see zz_kovn_harness.go): the runtime handles as initRuntime makes them in
// v1.13 and v1.14 (k8s.io/kubernetes helpers taking an exec interface, util.GwIPtableCounters).
// xtask builds with the tag kovnlegacy for those versions.

package daemon

import (
	"github.com/kubeovn/felix/ipsets"
	"github.com/kubeovn/go-iptables/iptables"
	k8sipset "k8s.io/kubernetes/pkg/proxy/ipvs/ipset"
	k8siptables "k8s.io/kubernetes/pkg/util/iptables"
	k8sexec "k8s.io/utils/exec"

	kubeovnv1 "github.com/kubeovn/kube-ovn/pkg/apis/kubeovn/v1"
	"github.com/kubeovn/kube-ovn/pkg/util"
)

// harnessRuntime makes the iptables/ipset handles of initRuntime.
func harnessRuntime(c *Controller) error {
	// The handles initRuntime makes, by the same calls. initRuntime itself is not called: it also
	// clears OVS flows and starts the NetworkManager syncer. iptablesObsolete stays nil, as on a
	// node whose iptables is the legacy backend, so cleanObsoleteIptablesRules does nothing.
	c.iptables = make(map[string]*iptables.IPTables)
	c.ipsets = make(map[string]*ipsets.IPSets)
	c.gwCounters = make(map[string]*util.GwIPtableCounters)
	c.k8siptables = make(map[string]k8siptables.Interface)
	c.k8sExec = k8sexec.New()
	c.k8sipsets = k8sipset.New(c.k8sExec)
	if c.protocol == kubeovnv1.ProtocolIPv4 || c.protocol == kubeovnv1.ProtocolDual {
		ipt, err := iptables.NewWithProtocol(iptables.ProtocolIPv4)
		if err != nil {
			return err
		}
		c.iptables[kubeovnv1.ProtocolIPv4] = ipt
		c.ipsets[kubeovnv1.ProtocolIPv4] = ipsets.NewIPSets(ipsets.NewIPVersionConfig(ipsets.IPFamilyV4, IPSetPrefix, nil, nil))
		c.k8siptables[kubeovnv1.ProtocolIPv4] = k8siptables.New(c.k8sExec, k8siptables.ProtocolIPv4)
	}
	if c.protocol == kubeovnv1.ProtocolIPv6 || c.protocol == kubeovnv1.ProtocolDual {
		ipt, err := iptables.NewWithProtocol(iptables.ProtocolIPv6)
		if err != nil {
			return err
		}
		c.iptables[kubeovnv1.ProtocolIPv6] = ipt
		c.ipsets[kubeovnv1.ProtocolIPv6] = ipsets.NewIPSets(ipsets.NewIPVersionConfig(ipsets.IPFamilyV6, IPSetPrefix, nil, nil))
		c.k8siptables[kubeovnv1.ProtocolIPv6] = k8siptables.New(c.k8sExec, k8siptables.ProtocolIPv6)
	}
	return nil
}
