//go:build kovnharness && !kovnnoservices

// kube-ovn-ebpf's harness (see zz_kovn_harness.go): the Controller has a Service lister (v1.14+).

package daemon

import "kube-ovn-ebpf/go/kube-ovn-harness/cluster"

func harnessServices(c *Controller, l *cluster.Listers) { c.servicesLister = l.Services }
